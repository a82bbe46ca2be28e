"""The structure-aware encoder's distance bias between our megatron module (models/esm_structure.DistanceBias) and
the exported `structure/` directory that hf/structure.py reads beside esm/ (an EsmModel). One name table serves
both directions; the per-head layer is split by rows (heads) over tensor-parallel ranks, the rest replicated."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.checkpoint.run_dir import RunDir
from megatron_p2t.checkpoint.slicing import Slice, copy_into, span

# megatron name -> exported name, and whether its rows are split by attention heads
NAMES = {"means": ("means", False), "stds": ("stds", False),
         "linear_fc1.weight": ("fc1.weight", False), "linear_fc1.bias": ("fc1.bias", False),
         "linear_heads.weight": ("heads.weight", True), "linear_heads.bias": ("heads.bias", True),
         "linear_embed.weight": ("embed.weight", False), "linear_embed.bias": ("embed.bias", False)}
MODEL_TYPE = "megatron_p2t_structure_bias"


def _rows(heads: int, tp_rank: int, tp: int):
    return span(heads, tp_rank, tp, "ESM attention heads (the distance bias's per-head layer)")


def hf_slices(bias, heads: int, tp_rank: int, tp: int) -> List[Slice]:
    sd = bias.state_dict()
    h0, h1 = _rows(heads, tp_rank, tp)
    return [Slice(hf, 0, h0, h1, sd[meg].detach()) if split else Slice(hf, None, 0, 0, sd[meg].detach())
            for meg, (hf, split) in NAMES.items()]


def config(structure_cfg, heads: int) -> dict:
    return {"model_type": MODEL_TYPE, "heads": heads, **dataclasses.asdict(structure_cfg)}


def structure_tensors(path: str) -> Optional[dict]:
    """A run's trained distance bias (model.encoder=esm2_structure), whole, by megatron name: the per-head layer
    gathered from its tensor-parallel ranks, the rest as the first of them has it; None when the run has none."""
    pre = "esm.structure."
    mods = [m for m in RunDir.module_states(path) if any(k.startswith(pre) for k in m)]
    if not mods:
        return None
    return {meg: torch.cat([m[pre + meg] for m in mods], 0) if split else mods[0][pre + meg]
            for meg, (_, split) in NAMES.items()}


def load_run(esm, src: str, tp_rank: int, tp: int) -> None:
    """A run's trained distance bias (warm-up or stage 1) into this rank's structure-aware encoder (its heads of the
    per-head layer)."""
    whole = structure_tensors(src)
    if whole is None:
        raise CheckpointError(f"{src}: no esm.structure.* tensors; name a warmup-structure, align or instruct run of "
                              f"the structure-aware encoder (model.encoder=esm2_structure)")
    h0, h1 = _rows(whole["linear_heads.weight"].shape[0], tp_rank, tp)
    copy_into(esm.structure, {meg: whole[meg][h0:h1] if split else whole[meg] for meg, (_, split) in NAMES.items()},
              src)
