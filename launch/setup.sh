#!/usr/bin/env bash
# Sets up a fresh CPU machine (development, CI): system tools from Debian, then a virtual environment in .venv
# with the CPU build of torch and the project. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need=()
command -v mmseqs >/dev/null || need+=(mmseqs2)
command -v blastp >/dev/null || need+=(ncbi-blast+)   # evaluate --baseline blast
# a real single-node SLURM for the launcher tests (tests/launch/slurm_cluster.py starts it)
command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] || need+=(slurm-wlm)
command -v munged >/dev/null || [ -x /usr/sbin/munged ] || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (Debian)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# P2T_DEPS=floor (launch/test_floor.sh): .venv-floor, holding the lowest versions pyproject.toml allows
VENV=.venv; [ "${P2T_DEPS:-}" != floor ] || VENV=.venv-floor
if [ ! -x $VENV/bin/python ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv $VENV
fi
if ! $VENV/bin/python -c "import megatron_p2t, torch, deepspeed, megatron.core, webdataset" 2>/dev/null \
   || [ pyproject.toml -nt $VENV/.installed ] || [ constraints-cpu.txt -nt $VENV/.installed ]; then
  if [ $VENV = .venv-floor ]; then
    # uv's lowest-direct: each direct dependency at its floor, what they need at its newest. PyPI's torch for
    # Linux is the CUDA build, with NVIDIA's libraries (about 4 GB); it runs on a CPU.
    echo "setup: installing the lowest versions pyproject.toml allows into $VENV"
    $VENV/bin/pip install -q --disable-pip-version-check "uv==0.13.9"
    $VENV/bin/uv pip install -q --python $VENV/bin/python --resolution lowest-direct -e ".[dev,mpi]"
  else
    echo "setup: installing torch (CPU) and the project into $VENV"
    $VENV/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
    $VENV/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev,mpi]"
  fi
  touch $VENV/.installed
fi
echo "setup: ready in $VENV ($($VENV/bin/python -c 'from importlib.metadata import version as v
print(", ".join(f"{p} {v(p)}" for p in ("torch", "transformers", "deepspeed", "megatron-core")))'))"
