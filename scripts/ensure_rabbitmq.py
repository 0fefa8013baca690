"""Make sure RabbitMQ answers for the tests; start the system's rabbitmq-server if not.

Used by ``make test`` (the end-to-end delivery, crash and dead-letter tests also run on
RabbitMQ). The URL is ``OUTBOX_TEST_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``).
Exits non-zero with what to do when neither a running RabbitMQ nor a ``rabbitmq-server``
is available: the tests would fail anyway, this says why first.
"""

import os
import shutil
import subprocess
import sys
import time
from urllib.parse import urlsplit

from kombu import Connection

url = os.environ.get("OUTBOX_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
shown = url.split("@")[-1]


def ping() -> bool:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0)
        return True
    except Exception:
        return False


if ping():
    sys.exit(0)
host = urlsplit(url).hostname or "localhost"
if host not in ("localhost", "127.0.0.1", "::1"):
    sys.exit(f"RabbitMQ at {shown} does not answer, and it is not local: start it, "
             "or set OUTBOX_TEST_AMQP_URL.")
server = shutil.which("rabbitmq-server")
if server is None:
    sys.exit(f"RabbitMQ at {shown} does not answer and no rabbitmq-server is installed. "
             "Install it (Debian: apt-get install rabbitmq-server) or set OUTBOX_TEST_AMQP_URL.")
print(f"starting rabbitmq-server (nothing answers at {shown}) …", flush=True)
subprocess.run([server, "-detached"], check=False)
for _ in range(120):   # a cold start takes several seconds
    if ping():
        print(f"started rabbitmq-server; it answers at {shown}")
        sys.exit(0)
    time.sleep(0.5)
sys.exit(f"started rabbitmq-server but nothing answers at {shown} after 60 s; "
         "see /var/log/rabbitmq/")
