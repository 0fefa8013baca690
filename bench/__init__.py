"""Benchmarks for integration-outbox: the durable pipeline against a bare Celery baseline.

``python -m bench`` (or ``make bench``) runs everything in one go and prints a
table with three ratios, each measured against a baseline in the same run:

(a) throughput: enqueue → after-commit dispatch → worker ``outbox.deliver`` →
    sandbox → row delivered, vs a bare Celery task doing the same POST;
(b) marginal request cost: ``enqueue`` in the caller's transaction vs a
    ``.delay()`` after commit;
(c) commit-to-provider latency at half the measured pipeline capacity.

Loopback only, bounded in count and time; every process it starts is stopped
at the end. Results also go to ``var/bench-results.json``.
"""
