#!/usr/bin/env bash
# Prints FLOWER_BASIC_AUTH for `make run`: the environment's, else one generated once into
# var/flower-credentials (mode 600) so the demo is never served without a password.
set -eu
if [ -n "${FLOWER_BASIC_AUTH:-}" ]; then printf '%s' "$FLOWER_BASIC_AUTH"; exit 0; fi
mkdir -p var
if [ ! -s var/flower-credentials ]; then
  umask 077
  printf 'admin:%s' "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')" > var/flower-credentials
fi
cat var/flower-credentials
