#!/usr/bin/env bash
# Install everything the test suite needs, build the Cython core, run the suite.
# Usage: ci/test.sh [pytest args...]     (the README's test command; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser test drives Debian's Chromium (tests/test_browser.py fails, not skips, without it).
if ! command -v chromium >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    command -v chromium >/dev/null
fi
python3 -m pip install --disable-pip-version-check -q -e '.[test]'
# The editable install builds teomq/_core in place; tests/conftest.py refuses to run without it.
exec python3 -m pytest "$@"
