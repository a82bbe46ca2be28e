"""Projector weights in their plain layout ({fc1,fc2}.{weight,bias}, Prot2Text-V2's `adapter.*` names) sliced
for a tensor-parallel rank: fc1 is column-parallel (rows and bias split), fc2 row-parallel (columns split,
bias whole)."""
from __future__ import annotations

from typing import Dict

import torch

from megatron_p2t.checkpoint.llama_hf import _span


def tensors(src, cfg, tp_rank: int, tp: int, prefix: str = "") -> Dict[str, torch.Tensor]:
    i0, i1 = _span(cfg.intermediate_dim, tp_rank, tp, "projector intermediate_dim")
    return {"fc1.weight": src.get(f"{prefix}fc1.weight", 0, i0, i1),
            "fc1.bias": src.get(f"{prefix}fc1.bias", 0, i0, i1),
            "fc2.weight": src.get(f"{prefix}fc2.weight", 1, i0, i1),
            "fc2.bias": src.get(f"{prefix}fc2.bias")}


def hf_slices(proj, cfg, tp_rank: int, tp: int, prefix: str = ""):
    sd = proj.state_dict()
    i0, i1 = _span(cfg.intermediate_dim, tp_rank, tp, "projector intermediate_dim")
    out = [(f"{prefix}fc1.weight", 0, i0, i1, sd["fc1.weight"]), (f"{prefix}fc1.bias", 0, i0, i1, sd["fc1.bias"]),
           (f"{prefix}fc2.weight", 1, i0, i1, sd["fc2.weight"])]
    if tp_rank == 0:
        out.append((f"{prefix}fc2.bias", None, 0, 0, sd["fc2.bias"]))
    return out
