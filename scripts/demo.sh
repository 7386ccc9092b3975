#!/usr/bin/env bash
# The README's first command: sets up .venv if needed, then runs `slim demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
exec .venv/bin/slim demo "$@"
