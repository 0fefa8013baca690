#!/usr/bin/env bash
# Prints OUTBOX_WEB_AUTH for `make run`: the environment's, else one generated once into
# var/web-credentials (mode 600), so the admin app is never served without a password.
set -eu
if [ -n "${OUTBOX_WEB_AUTH:-}" ]; then printf '%s' "$OUTBOX_WEB_AUTH"; exit 0; fi
mkdir -p var
if [ ! -s var/web-credentials ]; then
  umask 077
  printf 'admin:%s' "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')" > var/web-credentials
fi
cat var/web-credentials
