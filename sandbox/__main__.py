"""``python -m sandbox``: run the sandbox in the foreground."""

import sys

from sandbox.server import main

sys.exit(main())
