#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, for its Python 3.12 on x86-64: megatron-core,
# DeepSpeed and webdataset at the versions of constraints-cpu.txt, and their dependencies that are not in that
# machine's image (see the device tool's KINDS.md). DeepSpeed publishes only a source archive: its wheel is built
# here without compiled ops (pure Python, any Python 3), as `pip install deepspeed` does by default.
set -euo pipefail
cd "$(dirname "$0")/../.."
pin() { grep -E "^$1==" constraints-cpu.txt | cut -d= -f3; }
mkdir -p .whl
rm -f .whl/*.whl
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 -d .whl -q)
"${PIP[@]}" "megatron-core==$(pin megatron-core)" "webdataset==$(pin webdataset)" braceexpand==0.1.7 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
python3 -m pip wheel --no-deps --no-build-isolation -q -w .whl "deepspeed==$(pin deepspeed)" 2>/dev/null \
  || python3 -m pip wheel --no-deps -q -w .whl "deepspeed==$(pin deepspeed)"
ls -la .whl
du -sh .whl
