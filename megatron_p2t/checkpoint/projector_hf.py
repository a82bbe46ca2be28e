"""Projector weights in their plain layout ({fc1,fc2}.{weight,bias}, Prot2Text-V2's `adapter.*` names) sliced
for a tensor-parallel rank: fc1 is column-parallel (rows and bias split), fc2 row-parallel (columns split,
bias whole)."""
from __future__ import annotations

from typing import Dict, List

import torch

from megatron_p2t.checkpoint.slicing import Entry, Slice, read, span, write

TABLE = (Entry("fc1.weight", ("fc1.weight",), 0, ("inner",)), Entry("fc1.bias", ("fc1.bias",), 0, ("inner",)),
         Entry("fc2.weight", ("fc2.weight",), 1, ("inner",)), Entry("fc2.bias", ("fc2.bias",)))


def _spans(cfg, tp_rank: int, tp: int):
    return {"inner": span(cfg.intermediate_dim, tp_rank, tp, "projector intermediate_dim")}


def tensors(src, cfg, tp_rank: int, tp: int, prefix: str = "") -> Dict[str, torch.Tensor]:
    return read(TABLE, src, prefix, "", _spans(cfg, tp_rank, tp))


def hf_slices(proj, cfg, tp_rank: int, tp: int, prefix: str = "", sd=None) -> List[Slice]:
    """This rank's share of the plain tensors, of `sd` (tensor-parallel rank tp_rank's projector state dict, e.g.
    from a checkpoint) instead of the module's own when given."""
    return write(TABLE, proj.state_dict() if sd is None else sd, prefix, "", _spans(cfg, tp_rank, tp), tp_rank)
