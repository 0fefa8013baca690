"""Secrets at rest (``integrations.secretbox``): Fernet keys from ``OUTBOX_SECRET_KEY`` or its
file, the first one current, every one able to decrypt; errors say what to do in one line
that the log sanitiser leaves whole, and never quote a key."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from integrations.errors import ConfigurationError
from integrations.sanitize import sanitize
from integrations.secretbox import SecretBox, SecretUnreadable, configured_keys

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def test_the_first_key_encrypts_and_every_key_decrypts():
    token = SecretBox([OLD]).encrypt("whsec_abc")
    assert "whsec_abc" not in token
    rotated = SecretBox([NEW, OLD])
    assert rotated.decrypt(token) == "whsec_abc" and not rotated.is_current(token)
    moved = rotated.rotate(token)
    assert rotated.is_current(moved) and SecretBox([NEW]).decrypt(moved) == "whsec_abc"
    with pytest.raises(SecretUnreadable, match="cannot be decrypted"):
        SecretBox([NEW]).decrypt(token)


def test_keys_come_from_the_variable_or_its_file(tmp_path):
    assert configured_keys({"OUTBOX_SECRET_KEY": f" {NEW} , {OLD} "}) == [NEW, OLD]
    path = tmp_path / "keys"
    path.write_text(f"{NEW}\n{OLD}\n")
    assert configured_keys({"OUTBOX_SECRET_KEY_FILE": str(path)}) == [NEW, OLD]
    assert configured_keys({}) == []


@pytest.mark.parametrize("environ, says", [
    ({}, "OUTBOX_SECRET_KEY (or OUTBOX_SECRET_KEY_FILE) is required"),
    ({"OUTBOX_SECRET_KEY": "not-a-key"}, "key 1 of 1 in OUTBOX_SECRET_KEY is not a Fernet key"),
    ({"OUTBOX_SECRET_KEY": f"{NEW},nope"}, "key 2 of 2 in OUTBOX_SECRET_KEY is not a Fernet"),
    ({"OUTBOX_SECRET_KEY_FILE": "/nonexistent/key"},
     "cannot read '/nonexistent/key' (No such file or directory), the file "
     "OUTBOX_SECRET_KEY_FILE names"),
    ({"OUTBOX_SECRET_KEY": NEW, "OUTBOX_SECRET_KEY_FILE": "/k"},
     "set OUTBOX_SECRET_KEY or OUTBOX_SECRET_KEY_FILE, not both"),
])
def test_a_bad_key_setting_is_one_clear_line(environ, says):
    with pytest.raises(ConfigurationError) as refused:
        SecretBox.from_env(environ)
    text = str(refused.value)
    assert says in text and "\n" not in text and "nope" not in text
    assert sanitize(text) == text   # the CLI prints it through the sanitiser: nothing masked
