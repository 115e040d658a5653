#!/usr/bin/env bash
# System packages the test suite needs from Debian: headless Chromium (report and model card
# rendered as people see them) and PostgreSQL (the team tracking server, run for real).
# Idempotent: a quick no-op when everything is present; apt-get runs only as root and only
# for what is missing. Without root it prints what is missing and exits 0: those tests then
# skip with the reason (under CI=true they fail instead, so CI must run this as root).
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# Chromium does not pull in a font; without one, pages render as empty boxes.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system_deps: missing ${missing[*]} (not root: install them with apt-get, or the tests that need them skip)" >&2
  exit 0
fi
echo "system_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt run instead of failing on its lock.
apt_opts=(-o DPkg::Lock::Timeout=600 -q)
apt-get "${apt_opts[@]}" update >/dev/null
apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
