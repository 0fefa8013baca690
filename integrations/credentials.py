"""API key credentials, from the environment or from a file that may be rotated under us.

A file source is re-read whenever its identity (inode, size, mtime) changes, so a key
can be rotated by replacing the file, without restarting workers. ``refresh()`` forces
a re-read; the provider calls it once after a 401.

A key that cannot be read (no key configured, file missing, unreadable, empty or not
UTF-8) raises ``CredentialUnavailable``: a ``Deferred``, so the message waits without
spending an attempt instead of being dead-lettered, and ``outbox status`` reports it as
critical. Workers check their providers' keys at start-up (``check()``) and refuse to
start on one they cannot read.

Any credential the HTTP client uses only needs ``get() -> str`` and ``refresh() -> None``
(``Credential``), so an OAuth2 token source can stand in for ``ApiKey``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from integrations.errors import CredentialUnavailable
from integrations.settings import ProviderSettings, env_name

# A message whose credential cannot be read waits this long before it is tried again.
CREDENTIAL_RETRY_S = 30.0


class Credential(Protocol):
    """What the HTTP client needs from a credential."""

    def get(self) -> str:
        """Return the current secret. Raises CredentialUnavailable when none can be read."""

    def refresh(self) -> None:
        """Forget anything cached so the next ``get()`` fetches the secret afresh."""


class ApiKey:
    """A static API key, from a value or from a file re-read when it changes.

    ``repr``/``str`` never show the key.
    """

    def __init__(self, value: str | None = None, path: Path | str | None = None, *,
                 source: str = "API key", file_variable: str = "API key file",
                 what: str = "API key"):
        """Create the credential.

        Args:
            value: the key itself (from ``OUTBOX_<NAME>_API_KEY``), or None.
            path: file holding the key (from ``OUTBOX_<NAME>_API_KEY_FILE``), or None.
                Takes precedence over ``value`` when both are given.
            source: the variable names to cite when the key is missing.
            file_variable: the variable that named ``path``, cited in errors about the file.
            what: what the secret is, in errors (``client secret``).
        """
        self._value = value.strip() if value else None
        self._path = Path(path) if path is not None else None
        self._source = source
        self._file_variable = file_variable
        self._what = what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._cached: str | None = None

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> ApiKey:
        """The key configured for ``settings.name``."""
        source = (f"set {env_name(settings.name, 'API_KEY')} "
                  f"or {env_name(settings.name, 'API_KEY_FILE')}")
        return cls(settings.api_key, settings.api_key_file, source=source,
                   file_variable=env_name(settings.name, "API_KEY_FILE"))

    def get(self) -> str:
        """Return the key, re-reading the file if it changed since last read.

        Raises:
            CredentialUnavailable: no key configured, or the file is missing, unreadable,
                empty or not UTF-8 (the message names the variable, never the key).
        """
        if self._path is None:
            if not self._value:
                raise CredentialUnavailable(f"no {self._what} configured ({self._source})",
                                            code="credential_unavailable",
                                            retry_after_s=CREDENTIAL_RETRY_S)
            return self._value
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp or self._cached is None:
                self._cached = self._read()
                self._stamp = stamp
            return self._cached

    def check(self) -> list[str]:
        """Read the key now; return warnings about its file (readable by group or others).

        Raises:
            CredentialUnavailable: as ``get``.
        """
        self.get()
        if self._path is None:
            return []
        mode = os.stat(self._path).st_mode
        if mode & 0o044:
            return [f"{self._file_variable}: {self._path} is readable by group or others "
                    f"(mode {mode & 0o777:o}); chmod 600 it"]
        return []

    def refresh(self) -> None:
        """Force the next ``get()`` to re-read the key file (no-op for a value)."""
        with self._lock:
            self._stamp = None
            self._cached = None

    def _stat(self) -> tuple[int, int, int]:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise self._unavailable(exc.strerror or type(exc).__name__) from exc
        # inode catches rotation by atomic rename even within one mtime tick.
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> str:
        assert self._path is not None
        try:
            key = self._path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise self._unavailable(exc.strerror or type(exc).__name__) from exc
        except UnicodeDecodeError:
            raise self._unavailable("not UTF-8 text") from None
        if not key:
            raise self._unavailable("empty")
        return key

    def _unavailable(self, why: str) -> CredentialUnavailable:
        # The variable's name last: sanitize masks the word after "…KEY_FILE:".
        return CredentialUnavailable(f"cannot read {self._path} ({why}), the file "
                                     f"{self._file_variable} names",
                                     code="credential_unavailable",
                                     retry_after_s=CREDENTIAL_RETRY_S)

    def __repr__(self) -> str:
        where = f"file={str(self._path)!r}" if self._path else ("value=***" if self._value else "unset")
        return f"ApiKey({where})"

    __str__ = __repr__
