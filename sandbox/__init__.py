"""Fake providers on loopback with switchable faults, for development, tests and benchmarks.

``SandboxServer`` serves a Stripe-shaped payments API, a SendGrid-shaped email API
(``/v3/mail/send``) and a HubSpot-shaped CRM API (``/crm/v3/``, behind its OAuth2 server
``/oauth/``) plus a control API under ``/_sandbox/`` that injects faults, sets a
server-side rate limit and reports what the provider actually did (effects per
idempotency key), which is what end-to-end tests assert on.
"""

from sandbox.server import SandboxServer

__all__ = ["SandboxServer"]
