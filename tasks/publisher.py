"""The outbox's ``Publisher`` for Celery: one ``outbox.deliver`` message per row, on the
provider's queue, carrying only the row id (label shown in Flower via ``argsrepr``)."""

from __future__ import annotations

from collections.abc import Sequence

from outbox.dispatch import MessageRef


class CeleryPublisher:
    """Publishes through the app's producer pool (a pooled connection, not a client per call)."""

    def __init__(self, app=None):
        from . import app as default_app

        self.app = app or default_app

    def publish(self, refs: Sequence[MessageRef]) -> None:
        from .delivery import deliver

        with self.app.producer_or_acquire() as producer:
            for ref in refs:
                deliver.apply_async(
                    args=[ref.id], queue=ref.provider, routing_key=ref.provider,
                    argsrepr=ref.label, kwargsrepr="", producer=producer,
                    retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2,
                                              "interval_step": 0.5, "interval_max": 1})

    def publish_dead_letter(self, message_id: str, label: str) -> None:
        from .alerts import dead_letter_alert

        dead_letter_alert.apply_async(args=[message_id], argsrepr=label, kwargsrepr="",
                                      queue="dead_letter", routing_key="dead_letter")
