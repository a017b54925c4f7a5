#!/usr/bin/env bash
# The main job: the demo (offline, CPU). Outputs go to ./demo_output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/python examples/demo.py "$@"
