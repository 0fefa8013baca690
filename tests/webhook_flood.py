"""A burst of signed webhooks, as fast as 16 connections can send them, from a process of
its own (so the test process, which times outbound deliveries, is not the one busy):

    python -m tests.webhook_flood URL COUNT PREFIX

Prints ``sending`` when it starts and, at the end, one JSON line: the count of each answer
status (or exception name) and the seconds the burst took. Exit 0 once every webhook was
answered, whatever the answers were: the test judges them.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.inbound import SECRET, signed_event

CONNECTIONS = 16


def main(url: str, count: int, prefix: str) -> None:
    local = threading.local()
    answers: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def send(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = requests.Session()
            local.http.trust_env = False
        body, headers = signed_event(f"{prefix}_{i}", SECRET)
        try:
            answer = str(local.http.post(url + "/webhooks/payments", data=body, headers=headers,
                                         timeout=60).status_code)
        except requests.RequestException as exc:
            answer = type(exc).__name__
        with lock:
            answers[answer] += 1

    print("sending", flush=True)
    started = time.monotonic()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        list(pool.map(send, range(count)))
    print(json.dumps({"answers": dict(answers),
                      "elapsed_s": round(time.monotonic() - started, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
