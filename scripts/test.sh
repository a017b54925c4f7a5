#!/usr/bin/env bash
# The test suite (CPU, a few minutes). Extra arguments go to pytest, e.g. `-k codec` or `-m slow`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
