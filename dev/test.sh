#!/usr/bin/env bash
# The test suite on a fresh machine, as CI runs it: a virtual environment with the CPU build of torch and
# the test extras, the two system tools some tests need, then pytest (arguments go to pytest).
# - chromium: tests/test_report.py renders the HTML report headless and checks its screenshot;
# - g++: torch.compile's CPU code generation (tests/test_train.py's compile test).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=$(for tool in chromium g++; do command -v "$tool" >/dev/null || echo "$tool"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    echo "dev/test.sh: the tests need $missing; install it (Debian: apt-get install $missing) and run again" >&2
    exit 1
  fi
  echo "dev/test.sh: installing $missing (Debian packages)"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq $missing >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
