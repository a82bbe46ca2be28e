#!/usr/bin/env bash
# The whole suite on the lowest versions pyproject.toml allows for its direct dependencies (uv's lowest-direct
# resolution, in .venv-floor), so that an environment already holding them is one the tests passed on. Not part
# of CI: PyPI's lowest allowed torch is its CUDA build with NVIDIA's libraries (about 4 GB to fetch, 5 GB on
# disk). Run it when a floor in pyproject.toml moves; docs/testing.md keeps the result.
set -euo pipefail
cd "$(dirname "$0")/.."
P2T_DEPS=floor exec bash launch/test.sh "$@"
