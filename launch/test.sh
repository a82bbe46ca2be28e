#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow multi-process tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
# --durations: every run (CI included) lists its slowest cases, so a test that grows is seen where it happens
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
