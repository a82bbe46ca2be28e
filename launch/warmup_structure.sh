#!/usr/bin/env bash
''''exec "${PYTHON:-python3}" -u -- "$0" "$@" # '''
# The structure-aware encoder's warm-up (SEPIT). Valid as bash AND as Python, as launch/align.sh:
#   deepspeed --num_gpus 8 launch/warmup_structure.sh --config configs/sepit.yaml train.save_dir=runs/sepit/warmup
#   bash launch/warmup_structure.sh --config configs/sepit_tiny_cpu.yaml warmup.text_encoder=DIR
import sys

from megatron_p2t.cli import main

sys.exit(main(["warmup-structure", *sys.argv[1:]]))
