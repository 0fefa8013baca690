"""Secrets at rest: OAuth2 tokens and webhook signing secrets are stored encrypted with
``cryptography``'s Fernet (AES-128-CBC + HMAC-SHA256, authenticated), never in clear.

The keys come from ``OUTBOX_SECRET_KEY`` or ``OUTBOX_SECRET_KEY_FILE``: one or more Fernet
keys, comma-separated (or one per line in the file). The first key encrypts; every key
decrypts (``MultiFernet``), so a key is rotated by putting the new one first, running
``outbox secrets rotate`` (re-encrypts every stored secret under it), then dropping the old
one. Generate a key with::

    python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"

Nothing here ever puts a key or a plaintext in an error message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from integrations.errors import ConfigurationError
from integrations.settings import secret_values

KEY_VARIABLE = "OUTBOX_SECRET_KEY"
FILE_VARIABLE = "OUTBOX_SECRET_KEY_FILE"
GENERATE = ('python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())"')


class SecretUnreadable(ConfigurationError):
    """A stored secret that none of the configured keys decrypts (a key was dropped too
    early, or the row was tampered with)."""


def configured_keys(environ: Mapping[str, str] | None = None) -> list[str]:
    """The keys of ``OUTBOX_SECRET_KEY`` (or the file ``OUTBOX_SECRET_KEY_FILE`` names), in
    order, blanks dropped; [] when neither is set.

    Raises:
        ConfigurationError: both are set, or the file cannot be read.
    """
    return secret_values(os.environ if environ is None else environ, KEY_VARIABLE,
                         FILE_VARIABLE)


class SecretBox:
    """Encrypts under the first configured key, decrypts under any of them."""

    def __init__(self, keys: list[str]):
        """Raises: ConfigurationError: no key, or one that is not a Fernet key (which one
        is said by position, never by value)."""
        if not keys:
            raise ConfigurationError(f"{KEY_VARIABLE} (or {FILE_VARIABLE}) is required to "
                                     f"store secrets; generate a key with: {GENERATE}")
        fernets = []
        for position, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"key {position} of {len(keys)} in {KEY_VARIABLE} is not a Fernet key (32 "
                    f"url-safe base64-encoded bytes); generate one with: {GENERATE}") from None
        self._fernet = MultiFernet(fernets)
        self._current = fernets[0]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SecretBox:
        """The box of the configured keys. Raises ConfigurationError (see ``__init__``)."""
        return cls(configured_keys(environ))

    def encrypt(self, plaintext: str) -> str:
        """The Fernet token (ASCII) of ``plaintext`` under the current key."""
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The plaintext of ``token``.

        Raises:
            SecretUnreadable: no configured key decrypts it.
        """
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretUnreadable(
                f"a stored secret cannot be decrypted with any key in {KEY_VARIABLE} (was "
                "the key that encrypted it removed before `outbox secrets rotate`?)") from None

    def is_current(self, token: str) -> bool:
        """Whether ``token`` is encrypted under the current (first) key."""
        try:
            self._current.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeError):
            return False
        return True

    def rotate(self, token: str) -> str:
        """``token`` re-encrypted under the current key (``MultiFernet.rotate``).

        Raises:
            SecretUnreadable: no configured key decrypts it.
        """
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise SecretUnreadable(
                f"a stored secret cannot be decrypted with any key in {KEY_VARIABLE}") from None

    def __repr__(self) -> str:
        return "SecretBox(***)"


_current: tuple[tuple, SecretBox] | None = None


def current() -> SecretBox:
    """The box of this process's ``OUTBOX_SECRET_KEY`` (or its file), built again only when
    the variable or the file changes (the file's identity, size and mtime, as ``ApiKey``
    re-reads a key file): the stores ask for it on every delivery, and a key added to the
    file is used without a restart.

    Raises:
        ConfigurationError: as ``SecretBox.from_env``.
    """
    global _current
    value, path = os.environ.get(KEY_VARIABLE, ""), os.environ.get(FILE_VARIABLE, "").strip()
    try:
        st = os.stat(path) if path else None
    except OSError:
        return SecretBox.from_env()   # raises, saying why the file cannot be read
    stamp = (value, path, st and (st.st_ino, st.st_size, st.st_mtime_ns))
    cached = _current
    if cached is not None and cached[0] == stamp:
        return cached[1]
    box = SecretBox.from_env()
    _current = (stamp, box)
    return box

