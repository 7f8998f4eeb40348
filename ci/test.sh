#!/usr/bin/env bash
# Install everything the test suite needs, build the Cython core, run the suite.
# Usage: ci/test.sh [pytest args...]     (the README's test command; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --disable-pip-version-check -q -e '.[test]'
# The editable install builds teomq/_core in place; tests/conftest.py refuses to run without it.
exec python3 -m pytest "$@"
