#!/usr/bin/env bash
# The device check in one command, at most 8 minutes on one H100/H200 (bench/gpu/check.py says what it measures):
#   bash bench/gpu/run.sh              real shapes on the GPU; figures in $OUT (else runs/gpu_check)/check.{json,md}
#   bash bench/gpu/run.sh --tiny       the same code paths at toy shapes on the CPU (tests/bench runs this)
# The GPU machine has torch, transformers, peft and mpi4py and no network: megatron-core, DeepSpeed and
# webdataset travel as wheels in .whl/ (bench/gpu/fetch_wheels.sh fills it here; name .whl in the run's carry).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import megatron.core, deepspeed, webdataset" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "megatron-core, deepspeed or webdataset is missing and .whl/ holds no wheels: run" \
         "bench/gpu/fetch_wheels.sh here and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/p2t_site .whl/*.whl
  export PYTHONPATH=/tmp/p2t_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# each section writes check.json as it ends, so a run cut at the limit still returns what it measured
exec timeout 480 "$PY" -m bench.gpu.check "$@"
