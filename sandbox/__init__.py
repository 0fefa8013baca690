"""Fake providers on loopback with switchable faults, for development, tests and benchmarks.

``SandboxServer`` serves a Stripe-shaped payments API plus a control API under
``/_sandbox/`` that injects faults and reports what the provider actually did
(effects per idempotency key), which is what end-to-end tests assert on.
"""

from sandbox.server import SandboxServer

__all__ = ["SandboxServer"]
