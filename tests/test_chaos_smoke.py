"""The chaos scenarios in their short sizes (``python -m bench.chaos --quick``), one test each.

Each runs the real stack in a fresh process (relay, Celery workers, the sandbox in its own
process, a scratch PostgreSQL database, a private redis-server) and fails when one of the
scenario's must-shows fails: something lost, an effect done twice, recovery too slow, a
probe too many. The one line of figures is in the failure message. ``make chaos`` runs the
full sizes; see ``bench/chaos.py`` for what each scenario does and how it is measured.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.chaos import SCENARIOS
from tests.harness import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_chaos_scenario_short(scenario):
    """Given the real stack, when the scenario's faults hit it, its must-shows hold."""
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--quick", "--only", scenario],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln.strip() for ln in done.stdout.splitlines()
             if ln.strip().startswith(scenario) and any(w in ln for w in ("PASS", "FAIL", "ERROR"))]
    figures = lines[-1] if lines else done.stdout[-2000:]
    assert done.returncode == 0, (f"exit {done.returncode}: {figures}\n"
                                  f"{done.stderr[-3000:]}")
