#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test (tests/test_browser.py drives it with
# Playwright; `playwright install` is never run). Does nothing when /usr/bin/chromium exists
# or when there is no apt-get (the test then skips locally, and fails in CI).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: no apt-get here; install Chromium at /usr/bin/chromium yourself" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
echo "setup-browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
