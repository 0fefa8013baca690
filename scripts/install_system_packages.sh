#!/usr/bin/env bash
# Installs the system (Debian) packages the test suite needs; safe to run any number of times.
#
#   chromium    the browser tests/test_e2e_flower_ui.py and test_e2e_web_ui.py drive
#               through Playwright. Debian's build is used on purpose: `playwright install`
#               would download a browser from a CDN at test time, which we never do.
#   prometheus  for `promtool`, which checks and unit-tests ops/prometheus/alerts.yml
#               (tests/test_alert_rules.py). Only the tool is used; no server is started.
#
# Nothing is fetched when everything is already installed (no `apt-get update` either), so
# `make test` stays fast and works offline once the machine is set up.
set -euo pipefail

PACKAGES=(chromium prometheus)

installed() {
  # dpkg, not `command -v`: a chromium from elsewhere on PATH (a snap, a download) is not the
  # /usr/bin/chromium the tests launch.
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for package in "${PACKAGES[@]}"; do
  installed "$package" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ] && [ "$(command -v chromium)" = /usr/bin/chromium ] \
    && [ -x /usr/bin/promtool ]; then
  exit 0
fi
if [ "${#missing[@]}" -eq 0 ]; then
  # dpkg lists them but a binary is gone: reinstall
  [ "$(command -v chromium)" = /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/promtool ] || missing+=(prometheus)
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_packages: apt-get not found; install ${missing[*]} with your system's package manager." >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install_system_packages: need root or sudo to install ${missing[*]}; run: apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "install_system_packages: installing ${missing[*]}"
# Non-interactive so a debconf prompt can never hang `make test`.
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends --reinstall "${missing[@]}"
