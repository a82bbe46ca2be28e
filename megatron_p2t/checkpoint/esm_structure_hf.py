"""The structure-aware encoder's distance bias between our megatron module (models/esm_structure.DistanceBias) and
the exported `structure/` directory that hf_structure.py reads beside esm/ (an EsmModel). One name table serves
both directions; the per-head layer is split by rows (heads) over tensor-parallel ranks, the rest replicated."""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

from megatron_p2t.checkpoint.slicing import Slice, span

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


def tensors(src, heads: int, tp_rank: int, tp: int) -> Dict[str, torch.Tensor]:
    """This rank's tensors from an exported structure/ directory (a TensorSource / HFDir)."""
    h0, h1 = _rows(heads, tp_rank, tp)
    return {meg: src.get(hf, 0, h0, h1) if split else src.get(hf) for meg, (hf, split) in NAMES.items()}


def config(structure_cfg, heads: int) -> dict:
    return {"model_type": MODEL_TYPE, "heads": heads, **dataclasses.asdict(structure_cfg)}
