"""``python -m bench``: run every benchmark and print the tables.

``python -m bench [options]`` runs the pipeline benchmark (``bench.run``), then the
rate-limit benchmark (``bench.ratelimit``; ``--quick`` is passed on to it) in a fresh
interpreter — ``celeryconfig`` and the Celery apps read ``REDIS_URL`` once, at import,
and the first benchmark has imported them on its own Redis DB.
``python -m bench ratelimit [options]`` runs only the rate-limit benchmark.
"""

import subprocess
import sys

argv = sys.argv[1:]
if argv[:1] == ["ratelimit"]:
    from bench.ratelimit import main as ratelimit

    raise SystemExit(ratelimit(argv[1:]))

from bench.run import main  # noqa: E402

code = main(argv)
print(flush=True)
rc = subprocess.call([sys.executable, "-m", "bench", "ratelimit",
                      *(["--quick"] if "--quick" in argv else [])])
raise SystemExit(code or rc)
