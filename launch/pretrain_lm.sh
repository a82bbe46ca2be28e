#!/usr/bin/env bash
''''exec "${PYTHON:-python3}" -u -- "$0" "$@" # '''
# A decoder-only recipe's stage 1 (ProLLaMA: continual pretraining on proteins written as text). Valid as bash
# AND as Python: `bash launch/pretrain_lm.sh ...` re-runs this file with Python (one process); the DeepSpeed
# launcher runs it with Python directly, one process per slot:
#   deepspeed --num_gpus 8 launch/pretrain_lm.sh --config configs/prollama.yaml --resume auto
#   deepspeed --hostfile hosts launch/pretrain_lm.sh --config configs/prollama.yaml train.save_dir=/shared/runs/lm
#   bash launch/pretrain_lm.sh --config configs/prollama_tiny_cpu.yaml
import sys

from megatron_p2t.cli import main

sys.exit(main(["pretrain-lm", *sys.argv[1:]]))
