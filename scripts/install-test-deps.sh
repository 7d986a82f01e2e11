#!/usr/bin/env bash
# System packages the tests need beyond pip's: Chromium, for the web demo's browser test
# (Playwright drives Debian's build; `playwright install` is never run). Idempotent: apt-get runs
# only when something is missing. The CI runs as root; elsewhere run it with sudo, or the browser
# test skips.
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    # not fatal for people: the browser test skips with this reason; CI must have it
    echo "install-test-deps: installing ${missing[*]} needs root (sudo $0); the browser test will skip" >&2
    [ -z "${CI:-}" ] || exit 1
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
