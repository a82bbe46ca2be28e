#!/usr/bin/env bash
''''exec "${PYTHON:-python3}" -u -- "$0" "$@" # '''
# Stage 1 (H-SCALE alignment). Valid as bash AND as Python: `bash launch/align.sh ...` re-runs this file with
# Python (one process); the DeepSpeed launcher runs it with Python directly, one process per slot:
#   deepspeed --num_gpus 8 launch/align.sh --config configs/prot2text_v2.yaml --resume auto
#   deepspeed --hostfile hosts launch/align.sh --config ... train.save_dir=/shared/runs/align
#   bash launch/align.sh --config configs/align_tiny_cpu.yaml
import sys

from megatron_p2t.cli import main

sys.exit(main(["align", *sys.argv[1:]]))
