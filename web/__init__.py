"""HTTP surface: the admin app (``outbox web``: pages, JSON API, ``/metrics``, ``/health``).

It reads and acts only through ``outbox`` (the same functions as the CLI) and asks
``integrations`` for the providers' live state; it never imports ``tasks`` internals.
"""
