#!/usr/bin/env bash
# Creates ./.venv with requirements.txt, or refreshes it when requirements.txt changed.
# Sourced by scripts/demo.sh and scripts/test.sh; needs only Python 3.11 on the PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (first run only: a few minutes)..." >&2
  "$python_bin" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
