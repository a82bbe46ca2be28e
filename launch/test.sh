#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow multi-process tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
# one thread per process when two workers share the two cores: OpenMP threads spin while they wait, so a second
# thread per process beside the other worker burns CPU without progress (tests that want more take it from here)
if [ "${TEST_WORKERS:-2}" != 0 ] && [ "${TEST_WORKERS:-2}" != 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
# as an activated venv: every process, launchers' children included, finds the venv's tools (deepspeed, torchrun,
# ninja) first. Debian's ninja 1.11 and the venv's 1.13 read each other's build log as stale: when DeepSpeed still
# JIT-built its CPU shm op (parallel/state.py now marks it off), each switch between them rebuilt it
VENV=.venv; [ "${P2T_DEPS:-}" != floor ] || VENV=.venv-floor   # launch/test_floor.sh
export PATH="$PWD/$VENV/bin:$PATH"
# --durations: every run (CI included) lists its slowest cases, so a test that grows is seen where it happens.
# -n: two pytest-xdist workers (the machine's 2 cores; single-process tests leave one idle otherwise), grouped
# and ordered by tests/conftest.py; TEST_WORKERS=0 runs everything in this process, in file order.
exec $VENV/bin/python -m pytest -q -rs --durations=15 -n "${TEST_WORKERS:-2}" --dist loadscope \
  --no-loadscope-reorder "$@"
