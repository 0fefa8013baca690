"""Start Flower for the outbox, refusing to run without basic-auth credentials.

    FLOWER_BASIC_AUTH=user:password python -m tasks.flower [--port 5555]

Flower reads ``FLOWER_BASIC_AUTH`` from the environment itself, so the password
never appears on a command line (``ps``) or in the Procfile. Note (measured):
Flower's ``/metrics`` and ``/healthcheck`` answer without authentication even
with basic auth on; they carry counts and task names, never arguments.

The task list (``/tasks``) leads with the ``args`` column (``TASKS_COLUMNS``): every
broker message carries only a row id, so a uuid says nothing, while ``args`` is our
``argsrepr`` label (``payments.charge 01J…``, never the payload). The ``exception``
column shows why a task failed or is retried, in codes only (``DeadLettered('payments.charge
01J… client_error 402 card_declined: not retryable')``); Flower does not cut it, where it
cuts ``args`` and ``result`` at 400 px. The ``uuid`` column comes last: it is the list's
link to each task's page. An operator filtering FAILURE reads which operations failed,
and why, in the list. A caller's own ``--tasks_columns`` (or ``--tasks-columns``) or
``FLOWER_TASKS_COLUMNS`` wins.
"""

from __future__ import annotations

import os
import sys

MIN_PASSWORD_LENGTH = 8
# Flower's default is name,uuid,state,received,runtime,worker; see the module docstring.
TASKS_COLUMNS = "name,args,state,exception,received,runtime,worker,uuid"


def check_credentials(value: str | None) -> str | None:
    """Return a problem with ``FLOWER_BASIC_AUTH``, or None if it is usable."""
    if not value:
        return "FLOWER_BASIC_AUTH is not set"
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip():
            return "FLOWER_BASIC_AUTH must be user:password (comma-separated for several)"
        if len(password) < MIN_PASSWORD_LENGTH:
            return f"FLOWER_BASIC_AUTH password must have at least {MIN_PASSWORD_LENGTH} characters"
    return None


def with_default_columns(argv: list[str], environ=os.environ) -> list[str]:
    """``argv`` plus our ``--tasks_columns``, unless the caller chose the columns already."""
    # Flower applies FLOWER_* variables first and the command line over them: adding our
    # flag would silently override the caller's variable.
    if environ.get("FLOWER_TASKS_COLUMNS"):
        return argv
    for arg in argv:
        # Tornado takes options only as --name=value, spelt with "_" or "-".
        if arg.partition("=")[0].lstrip("-").replace("-", "_") == "tasks_columns":
            return argv
    return [f"--tasks_columns={TASKS_COLUMNS}", *argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    problem = check_credentials(os.environ.get("FLOWER_BASIC_AUTH"))
    if problem:
        print(f"flower: refusing to start: {problem}. Flower shows every task and worker; "
              "set FLOWER_BASIC_AUTH=user:password.", file=sys.stderr)
        return 2
    address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
    port = os.environ.get("FLOWER_PORT", "5555")
    command = [sys.executable, "-m", "celery", "-A", "tasks", "flower",
               f"--address={address}", f"--port={port}", *with_default_columns(argv)]
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
