"""Helpers shared by the protection tests (real Redis through the ``client`` fixture of
``conftest.py``): a fresh provider name per test, and a ``Protection`` built from env-style
settings the way a worker process builds its own."""

from __future__ import annotations

import time
import uuid

from integrations.protection import Protection, ProtectionSettings


def new_name() -> str:
    """A provider name no other test uses, so its Redis keys start empty."""
    return f"t{uuid.uuid4().hex[:10]}"


def protection(client, name, sleep=time.sleep, operations=None, **env) -> Protection:
    """Provider ``name``'s protection on ``client``, configured by ``env``: ``RATE_LIMIT="50/s"``
    stands for ``OUTBOX_<NAME>_RATE_LIMIT=50/s``. Separate calls stand for separate workers."""
    environ = {f"OUTBOX_{name.upper()}_{k}": str(v) for k, v in env.items()}
    return Protection(ProtectionSettings.from_env(name, environ, operations=operations),
                      client, sleep=sleep)
