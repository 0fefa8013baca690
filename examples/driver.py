"""Demo traffic for ``make run``: a steady stream of orders, some designed to fail.

Every ``DRIVER_INTERVAL`` seconds (default 1) it places an order through the
shop. Before some orders it arms a sandbox fault for that order's idempotency
key, so Flower soon shows retries and dead letters:

* every 7th: 503 once, then success             → RETRY (transient), SUCCESS
* every 11th: 429 with Retry-After: 3           → RETRY (rate_limited), SUCCESS
* every 13th: 500 after the charge was made     → RETRY (ambiguous), SUCCESS, one charge
* every order also upserts its customer as a crm contact (OAuth2: the driver first connects
  the crm provider, the way ``outbox crm connect`` is used with a browser)
* every order also publishes ``order.created`` to the customers' webhook endpoints: the
  driver subscribes the sandbox's receiver (``/_sandbox/hooks/demo``) at start
* every 9th: customer ``cus_declined``          → FAILURE, a dead letter (fix with
  ``curl -X POST $SANDBOX/_sandbox/config -d '{"declined_customers": []}'``, then re-drive)

Bounded: it stops placing orders after ``DRIVER_MAX_ORDERS`` (default 600) and
then idles, because the Procfile runner stops everything when one process exits.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import uuid

import requests

SHOP = os.environ.get("SHOP_URL", f"http://127.0.0.1:{os.environ.get('SHOP_PORT', '8000')}")
SANDBOX = os.environ.get("OUTBOX_PAYMENTS_BASE_URL", "http://127.0.0.1:8100")
INTERVAL_S = float(os.environ.get("DRIVER_INTERVAL", "1"))
MAX_ORDERS = int(os.environ.get("DRIVER_MAX_ORDERS", "600"))


def arm_fault(key: str, fault: dict) -> None:
    requests.post(f"{SANDBOX}/_sandbox/faults", json={**fault, "match_key": key}, timeout=5)


def order_for(n: int, run: str) -> tuple[dict, dict | None]:
    reference = f"{run}-{n}"
    order = {"reference": reference, "amount": random.randint(100, 50_000), "currency": "usd",
             "customer": f"cus_{random.randint(1, 500)}"}
    fault = None
    if n % 9 == 0:
        order["customer"] = "cus_declined"
    elif n % 7 == 0:
        fault = {"fault": "error_before", "status": 503, "count": 1}
    elif n % 11 == 0:
        fault = {"fault": "rate_limit", "retry_after": "3", "count": 1}
    elif n % 13 == 0:
        fault = {"fault": "error_after", "status": 500, "count": 1}
    return order, fault


def wait_for(url: str) -> None:
    for _ in range(600):
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit(f"driver: {url} never answered")


def connect_crm() -> None:
    """Connect the crm provider as a person would with a browser: ``outbox crm connect``
    prints the sandbox's authorize URL; opening it approves at once and redirects to the
    command's loopback listener, which stores the tokens (connecting again replaces them)."""
    command = subprocess.Popen([sys.executable, "-m", "outbox.cli", "crm", "connect",
                                "--timeout", "60"], stdout=subprocess.PIPE, text=True)
    for line in command.stdout:
        if line.startswith("http"):
            try:
                requests.get(line.strip(), timeout=10)
            except requests.RequestException as exc:
                print(f"driver: crm authorisation failed: {type(exc).__name__}", flush=True)
            break
    if command.wait(timeout=90) == 0:
        print("driver: crm connected", flush=True)


def subscribe_demo_endpoint() -> None:
    """Register the sandbox's webhook receiver as a customer's endpoint for order.created
    (once: an endpoint with its URL already registered is kept)."""
    url = f"{SANDBOX}/_sandbox/hooks/demo"
    outbox = [sys.executable, "-m", "outbox.cli", "endpoints"]
    listed = subprocess.run([*outbox, "list", "--json"], capture_output=True, text=True)
    if listed.returncode == 0 and url in listed.stdout:
        return
    added = subprocess.run([*outbox, "add", url, "--events", "order.created", "--json"],
                           capture_output=True, text=True)
    print("driver: order.created webhooks go to " + url if added.returncode == 0 else
          f"driver: no demo endpoint: {added.stderr.strip()}", flush=True)


def main() -> None:
    wait_for(f"{SANDBOX}/_sandbox/stats?log=0")
    wait_for(f"{SHOP}/")
    connect_crm()
    subscribe_demo_endpoint()
    run = uuid.uuid4().hex[:6]
    placed = 0
    for n in range(1, MAX_ORDERS + 1):
        order, fault = order_for(n, run)
        try:
            if fault:
                arm_fault(f"order-{order['reference']}-charge", fault)
            requests.post(f"{SHOP}/orders", json=order, timeout=5).raise_for_status()
            placed += 1
        except requests.RequestException as exc:
            print(f"driver: order {n} not placed: {type(exc).__name__}", flush=True)
        if n % 20 == 0:
            print(f"driver: {placed} orders placed", flush=True)
        time.sleep(INTERVAL_S)
    print(f"driver: done, {placed} orders placed; idling", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
