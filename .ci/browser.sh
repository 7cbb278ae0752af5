#!/usr/bin/env bash
# The browser test (tests/serve/test_browser.py) drives Debian's chromium through playwright's Python package;
# playwright's own browser download is never used (no network in tests). Installs chromium if missing.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update
  apt-get install -y chromium
fi
/usr/bin/chromium --version
