#!/usr/bin/env bash
''''exec "${PYTHON:-python3}" -u -- "$0" "$@" # '''
# Stage 2 (LoRA instruction tuning, from the stage-1 run named by instruct.init_from). Valid as bash AND as
# Python: `bash launch/instruct.sh ...` re-runs this file with Python (one process); the DeepSpeed launcher
# runs it with Python directly, one process per slot:
#   deepspeed --num_gpus 8 launch/instruct.sh --config configs/prot2text_v2.yaml --resume auto
#   deepspeed --hostfile hosts launch/instruct.sh --config ... instruct.init_from=/shared/runs/align \
#       train.save_dir=/shared/runs/instruct
#   bash launch/instruct.sh --config configs/instruct_tiny_cpu.yaml
import sys

from megatron_p2t.cli import main

sys.exit(main(["instruct", *sys.argv[1:]]))
