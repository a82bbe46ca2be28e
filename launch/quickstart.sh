#!/usr/bin/env bash
# Set up (if needed) and run the default job end to end on the embedded sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/megatron-p2t quickstart "$@"
