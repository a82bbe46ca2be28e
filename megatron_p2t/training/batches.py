"""What every stage does with a batch and its data settings before the step."""
from __future__ import annotations

import dataclasses

import torch


def to_device(batch: dict) -> dict:
    """A loader's batch on this rank's GPU (unchanged on a CPU)."""
    if not torch.cuda.is_available():
        return batch
    return {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def training_data(cfg, data):
    """Training reads leave a protein's structure out with model.structure.dropout (evaluation reads keep all)."""
    return dataclasses.replace(data, structure_dropout=cfg.model.structure.dropout) if data.structure else data


# what `instruct.init_from` / `model.structure_init` name, for the errors when they name something else
STAGE1 = "the stage-1 run (`align`) in instruct.init_from"
WARMUP = "the `warmup-structure` run in model.structure_init"
