"""Talking to providers: HTTP policy, error classification, credentials, one adapter per provider.

Entry point for the delivery task::

    from integrations.registry import get_provider
    delivery = get_provider("payments").deliver("charge", payload, idempotency_key)

Importing this package imports nothing else, so ``integrations.errors`` stays cheap to use.
"""
