#!/usr/bin/env bash
# The README's test command: installs what the tests need (CPU torch via constraints.txt) into
# .venv when it is missing, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  .venv/bin/python -m pip install -q -c constraints.txt -e plugins/slim-plugin-example
fi
exec .venv/bin/python -m pytest "$@"
