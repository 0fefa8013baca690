"""``python -m bench``: run every benchmark and print the tables.

``python -m bench [options]`` runs the pipeline benchmark (``bench.run``), then the
rate-limit benchmark (``bench.ratelimit``) and the payload-validation benchmark
(``bench.validation``), each in a fresh interpreter — ``celeryconfig`` and the Celery apps
read ``REDIS_URL`` once, at import, and the first benchmark has imported them on its own
Redis DB. ``--quick`` and ``--smoke`` (tiny counts: proves they still run; ``make test``
runs it) are passed on.
``python -m bench ratelimit|validation|scale|backlog|scaleout|web|inbound [options]`` runs
only that benchmark (``scale``, ``backlog``, ``scaleout`` and ``web``, on PostgreSQL, are run by
``make bench`` after the others).
"""

import subprocess
import sys

argv = sys.argv[1:]
if argv[:1] == ["ratelimit"]:
    from bench.ratelimit import main as ratelimit

    raise SystemExit(ratelimit(argv[1:]))
if argv[:1] == ["validation"]:
    from bench.validation import main as validation

    raise SystemExit(validation(argv[1:]))
if argv[:1] == ["backlog"]:
    from bench.backlog import main as backlog

    raise SystemExit(backlog(argv[1:]))
if argv[:1] == ["scale"]:
    from bench.scale import main as scale

    raise SystemExit(scale(argv[1:]))
if argv[:1] == ["inbound"]:
    from bench.inbound import main as inbound

    raise SystemExit(inbound(argv[1:]))
if argv[:1] == ["web"]:
    from bench.web import main as web

    raise SystemExit(web(argv[1:]))
if argv[:1] == ["scaleout"]:
    from bench.scaleout import main as scaleout

    raise SystemExit(scaleout(argv[1:]))

from bench.run import main  # noqa: E402

code = main(argv)
passed = [flag for flag in ("--quick", "--smoke") if flag in argv]
for name in ("ratelimit", "validation"):
    print(flush=True)
    flags = [f for f in passed if not (name == "validation" and f == "--quick")]
    code = subprocess.call([sys.executable, "-m", "bench", name, *flags]) or code
raise SystemExit(code)
