"""``python -m bench``: run every benchmark and print the tables.

``python -m bench [options]`` runs the pipeline benchmark (``bench.run``), then the
rate-limit benchmark (``bench.ratelimit``; ``--quick`` is passed on to it);
``python -m bench ratelimit [options]`` runs only the rate-limit benchmark.
"""

import sys

argv = sys.argv[1:]
if argv[:1] == ["ratelimit"]:
    from bench.ratelimit import main as ratelimit

    raise SystemExit(ratelimit(argv[1:]))

from bench.run import main  # noqa: E402

code = main(argv)
if "-h" not in argv and "--help" not in argv:
    from bench.ratelimit import main as ratelimit

    print(flush=True)
    rc = ratelimit(["--quick"] if "--quick" in argv else [])
    code = code or rc
raise SystemExit(code)
