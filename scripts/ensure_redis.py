"""Make sure Redis answers at REDIS_URL; start the system's redis-server on loopback if not.

Used by ``make run`` and ``make test``. Exits non-zero with what to do when
neither a running Redis nor a ``redis-server`` binary is available.
"""

import os
import shutil
import subprocess
import sys
import time
from urllib.parse import urlparse

import redis

url = os.environ.get("REDIS_URL") or "redis://localhost:6379/0"


def ping() -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False


if ping():
    sys.exit(0)
parsed = urlparse(url)
host, port = parsed.hostname or "localhost", parsed.port or 6379
if host not in ("localhost", "127.0.0.1", "::1"):
    sys.exit(f"Redis at {url} does not answer, and it is not local: start it, or set REDIS_URL.")
server = shutil.which("redis-server")
if server is None:
    sys.exit(f"Redis at {url} does not answer and no redis-server is installed. "
             "Install it (Debian: apt-get install redis-server) or set REDIS_URL.")
os.makedirs("var", exist_ok=True)
subprocess.run([server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
                "--save", "", "--appendonly", "no", "--logfile", os.path.abspath("var/redis.log")],
               check=True)
for _ in range(50):
    if ping():
        print(f"started redis-server on 127.0.0.1:{port}")
        sys.exit(0)
    time.sleep(0.1)
sys.exit(f"started redis-server but it does not answer at {url}; see var/redis.log")
