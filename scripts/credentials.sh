#!/usr/bin/env bash
# Prints user:password for `make run`: the environment variable $1's value if set, else one
# generated once into var/$2-credentials (mode 600), so that the demo never serves Flower
# (FLOWER_BASIC_AUTH, flower) or the admin app (OUTBOX_WEB_AUTH, web) without a password.
#   scripts/credentials.sh FLOWER_BASIC_AUTH flower
set -eu
variable="$1" name="$2"
if [ -n "${!variable:-}" ]; then printf '%s' "${!variable}"; exit 0; fi
mkdir -p var
if [ ! -s "var/$name-credentials" ]; then
  umask 077
  printf 'admin:%s' "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')" > "var/$name-credentials"
fi
cat "var/$name-credentials"
