#!/usr/bin/env bash
# Prints the path of the demo's Fernet key file for `make run` (OUTBOX_SECRET_KEY_FILE: it
# encrypts the crm's OAuth tokens and the webhook endpoints' signing secrets at rest),
# generating var/secret-key (mode 600) once. A key set in the environment wins: then this
# prints nothing and `make run` leaves OUTBOX_SECRET_KEY as it is.
#   scripts/secret_key.sh .venv/bin/python
set -eu
python="$1"
if [ -n "${OUTBOX_SECRET_KEY:-}" ] || [ -n "${OUTBOX_SECRET_KEY_FILE:-}" ]; then
  printf '%s' "${OUTBOX_SECRET_KEY_FILE:-}"; exit 0
fi
mkdir -p var
if [ ! -s var/secret-key ]; then
  umask 077
  "$python" -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())" > var/secret-key
fi
printf '%s' "$PWD/var/secret-key"
