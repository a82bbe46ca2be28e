"""What the HF adapters share: a rank's span of a split dimension, the slice record export writes, one name
table per adapter read in both directions, and the checked copy into a model.

An adapter's table lists each megatron tensor with the HF tensor(s) it is made of, the dimension tensor
parallelism splits (None: replicated) and, per HF tensor, which span of that dimension this rank holds; a
`fuse` names how several HF tensors become one megatron tensor (megatron fuses q/k/v and gate/up) and back.
Import reads this rank's slices through the table; export gives the same slices back as `Slice`s, replicated
tensors from tensor-parallel rank 0 only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron_p2t.checkpoint.hf_dir import CheckpointError


class Slice(NamedTuple):
    """A rank's share of one HF tensor: rows (dim 0) or columns (dim 1) start:stop of it; dim None: whole."""
    name: str
    dim: Optional[int]
    start: int
    stop: int
    tensor: torch.Tensor


def span(n: int, rank: int, size: int, what: str) -> Tuple[int, int]:
    """This rank's [start, stop) of a dimension of n split evenly over `size` ranks."""
    if n % size:
        raise CheckpointError(f"{what} = {n} is not divisible by tensor-parallel size {size}")
    k = n // size
    return rank * k, (rank + 1) * k


@dataclasses.dataclass(frozen=True)
class Entry:
    megatron: str                 # name under the model part (a layer's entries: under its layer prefix)
    hf: Tuple[str, ...]           # HF name(s), under the HF part (a layer's: under its layer prefix)
    dim: Optional[int] = None     # the dimension split across tensor-parallel ranks; None: replicated
    spans: Tuple[str, ...] = ()   # per HF name, the key of its span in the adapter's spans
    fuse: Optional[str] = None    # several HF tensors -> one: the key of its (fuse, unfuse) pair


Fusers = Dict[str, Tuple[Callable[[List[torch.Tensor]], torch.Tensor], Callable[[torch.Tensor], List[torch.Tensor]]]]


def stack_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, 0)


def read(table: Sequence[Entry], src, hf_prefix: str, meg_prefix: str, spans: Dict[str, Tuple[int, int]],
         fusers: Fusers = {}) -> Dict[str, torch.Tensor]:
    """This rank's megatron tensors of the table's entries, read from `src` (HFDir / TensorSource)."""
    out = {}
    for e in table:
        parts = [src.get(hf_prefix + h) if e.dim is None else src.get(hf_prefix + h, e.dim, *spans[s])
                 for h, s in zip(e.hf, e.spans or (None,) * len(e.hf))]
        out[meg_prefix + e.megatron] = fusers[e.fuse][0](parts) if e.fuse else parts[0]
    return out


def write(table: Sequence[Entry], sd: Dict[str, torch.Tensor], hf_prefix: str, meg_prefix: str,
          spans: Dict[str, Tuple[int, int]], tp_rank: int, fusers: Fusers = {}) -> List[Slice]:
    """The inverse of `read`: this rank's tensors as slices of the HF tensors (replicated ones from rank 0,
    after the split ones: the order export writes them in)."""
    out = []
    for e in [e for e in table if e.dim is not None] + [e for e in table if e.dim is None and tp_rank == 0]:
        t = sd[meg_prefix + e.megatron]
        parts = fusers[e.fuse][1](t) if e.fuse else [t]
        for h, s, p in zip(e.hf, e.spans or (None,) * len(e.hf), parts):
            out.append(Slice(hf_prefix + h, None, 0, 0, p) if e.dim is None else Slice(hf_prefix + h, e.dim,
                                                                                         *spans[s], p))
    return out


def copy_into(module, tensors: Dict[str, torch.Tensor], source: str, keep: Tuple[str, ...] = ()) -> None:
    """Copy into `module`'s parameters, checking that every one is covered (except those under a `keep`
    prefix, which stay as they are) and every shape agrees."""
    own = {k: v for k, v in module.state_dict().items()
           if not k.endswith("_extra_state") and "rotary" not in k}
    missing = sorted(k for k in set(own) - set(tensors) if not k.startswith(keep))
    if missing:
        raise CheckpointError(f"{source}: nothing to load into {missing[:4]}")
    for k, t in tensors.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(t.shape)} there, the model expects "
                                  f"{tuple(own[k].shape)} -- a checkpoint of another model size?")
        own[k].copy_(t)
