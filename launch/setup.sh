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
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import megatron_p2t, torch, deepspeed, megatron.core, webdataset" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ constraints-cpu.txt -nt .venv/.installed ]; then
  echo "setup: installing torch (CPU) and the project into .venv"
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev,mpi]"
  touch .venv/.installed
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, deepspeed, megatron.core as m; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
