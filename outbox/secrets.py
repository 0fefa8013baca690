"""``outbox secrets rotate``: re-encrypt every secret stored in the database under the
current (first) key of ``OUTBOX_SECRET_KEY`` (``integrations.secretbox``).

Every encrypted column is listed in ``ENCRYPTED``; rotation reads each row, re-encrypts
the values not already under the current key (``MultiFernet.rotate``: decrypt with any
key, encrypt with the first) and writes them back, one table per transaction. It can be
run again at any time: rows already under the current key are left as they are. After it
has run everywhere, the old key can be dropped from ``OUTBOX_SECRET_KEY``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from integrations.secretbox import SecretBox

from .models import OAuthGrant, WebhookEndpoint

# (model, its encrypted columns). A table that stores a secret adds itself here.
ENCRYPTED: list[tuple[type, tuple[str, ...]]] = [
    (OAuthGrant, ("access_token", "refresh_token")),
    (WebhookEndpoint, ("secret", "previous_secret")),
]


def rotate(sessions: sessionmaker[Session], box: SecretBox) -> dict[str, int]:
    """Re-encrypt every stored secret under ``box``'s current key.

    Returns:
        Per table, the number of values re-encrypted.

    Raises:
        SecretUnreadable: a value no configured key decrypts (nothing of that table is
            written: its transaction rolls back).
    """
    counts: dict[str, int] = {}
    for model, columns in ENCRYPTED:
        changed = 0
        with sessions.begin() as session:
            for row in session.scalars(select(model).with_for_update()):
                for column in columns:
                    token = getattr(row, column)
                    if token and not box.is_current(token):
                        setattr(row, column, box.rotate(token))
                        changed += 1
        counts[model.__tablename__] = changed
    return counts
