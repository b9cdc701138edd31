#!/usr/bin/env bash
# Debian's Chromium for the inbox's browser test (tests/federation/test_inbox_browser.py),
# driven by Playwright with executable_path=/usr/bin/chromium. Playwright's own browser
# downloads are never used. Idempotent: does nothing when Chromium is already installed.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
