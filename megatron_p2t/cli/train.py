"""Training commands: every stage runs through the one driver (training/driver.py)."""
from __future__ import annotations

import dataclasses
import json
import sys

from megatron_p2t.cli.table import LOCAL_RANK, OVERRIDES, arg, command, torch_rank

STAGE_ARGS = (arg("--config", required=True),
              arg("--resume", default=None, help="'auto' (newest complete checkpoint in train.save_dir) or a "
                                                 "checkpoint directory"),
              LOCAL_RANK, OVERRIDES)


def train_stage(args, command: str) -> int:
    """A training stage from its config, through the one driver; pre-emption (checkpoint written) exits 0 so
    schedulers requeue."""
    from megatron_p2t.config import load_config
    from megatron_p2t.training import driver, stages
    from megatron_p2t.training.trainer import Stop
    cfg = load_config(args.config, args.overrides)
    try:
        result = driver.run(stages.for_command(command, cfg), cfg, resume=args.resume)
    except Stop as e:
        print(str(e), file=sys.stderr)
        result = None
    if result is not None and torch_rank() == 0:
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["final_loss"] = result["losses"][-1] if result["losses"] else None
        print(json.dumps(summary))
    return 0


@command("align", "stage 1: H-SCALE contrastive alignment, or the recipe's align.objective (run under "
                 "deepspeed/torchrun, or `deepspeed launch/align.sh` / `bash launch/align.sh`)", *STAGE_ARGS)
def cmd_align(args) -> int:
    """Stage 1: H-SCALE alignment (ESM frozen, projector trained), or the recipe's align.objective."""
    return train_stage(args, "align")


@command("warmup-structure", "SEPIT's warm-up of the structure-aware encoder (model.encoder="
                            "esm2_structure): pooled states vs a frozen text encoder (warmup.text_encoder), masked "
                            "residues, coordinate denoising; then stage 1 with model.structure_init=RUN", *STAGE_ARGS)
def cmd_warmup_structure(args) -> int:
    """SEPIT's warm-up of the structure-aware encoder: contrastive vs a frozen text encoder + MLM + denoising."""
    return train_stage(args, "warmup-structure")


@command("pretrain-lm", "a decoder-only recipe's stage 1 (ProLLaMA): LoRA + embedding/output layer on "
                       "proteins as text, documents packed with their own attention (`deepspeed "
                       "launch/pretrain_lm.sh`)", *STAGE_ARGS)
def cmd_pretrain_lm(args) -> int:
    """A decoder-only recipe's stage 1: continual pretraining on proteins written as text (ProLLaMA)."""
    return train_stage(args, "pretrain-lm")


@command("instruct", "stage 2: LoRA instruction tuning (`deepspeed launch/instruct.sh` / `bash "
                    "launch/instruct.sh`); instruct.init_from names the stage-1 run", *STAGE_ARGS)
def cmd_instruct(args) -> int:
    """Stage 2: LoRA instruction tuning (ESM frozen, connector + decoder LoRA trained)."""
    return train_stage(args, "instruct")


@command("cache-text", "stage 1: precompute the frozen text side's pooled vectors beside the shards (then align "
                       "with align.use_text_cache=true)", arg("--config", required=True), LOCAL_RANK, OVERRIDES)
def cmd_cache_text(args) -> int:
    """Stage 1's frozen text side, computed once for every shard (run under the same launcher as align)."""
    from megatron_p2t.config import ConfigError, load_config
    from megatron_p2t.parallel import state
    from megatron_p2t.parts import align_objective
    from megatron_p2t.training.text_cache import build_cache
    cfg = load_config(args.config, args.overrides)
    if align_objective(cfg.align.objective, cfg.model) != "hscale":
        raise ConfigError(f"cache-text precomputes H-SCALE's text side; this config's stage 1 is feature alignment "
                          f"(model.connector={cfg.model.connector}, align.objective={cfg.align.objective}), which "
                          f"runs the decoder on the text itself: run `align` without a cache")
    res = build_cache(cfg, state.initialize(dataclasses.replace(cfg.parallel.without_experts(), pipeline=1)))
    if torch_rank() == 0:
        print(json.dumps(res))
    return 0
