"""Write HF-format directories from a model spread over any TP x PP layout.

Every rank turns its local tensors into slices of HF tensors and saves them to a part file; rank 0 then
assembles one HF tensor at a time from the memory-mapped parts and writes safetensors shards with an index
file, so neither the ranks nor rank 0 ever hold the whole model at once beyond one output shard.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from typing import Dict, List, Optional

import torch

SHARD_BYTES = 2 << 30


def assemble(pieces):
    """One HF tensor from its (dim, start, stop, tensor) pieces, which must tile it."""
    if pieces[0][0] is None:
        return pieces[0][3].contiguous()
    dim = pieces[0][0]
    pieces = sorted(pieces, key=lambda p: p[1])
    ends = [p[2] for p in pieces]
    starts = [p[1] for p in pieces]
    if starts[0] != 0 or any(a != b for a, b in zip(ends[:-1], starts[1:])):
        raise RuntimeError(f"slices do not tile the tensor: {list(zip(starts, ends))}")
    return torch.cat([p[3] for p in pieces], dim).contiguous()


def whole(slices) -> Dict[str, torch.Tensor]:
    """Whole HF tensors from every rank's slices (Slice or (name, dim, start, stop, tensor)), which tile them."""
    pieces = defaultdict(list)
    for n, dim, a, b, t in slices:
        pieces[n].append((dim, a, b, t))
    return {n: assemble(p) for n, p in pieces.items()}


def write_safetensors_dir(out_dir: str, tensors: Dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES) -> None:
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    names = list(tensors)
    shards: List[List[str]] = [[]]
    size = 0
    for n in names:
        b = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    if len(shards) == 1:
        save_file({n: tensors[n] for n in shards[0]}, os.path.join(out_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, os.path.join(out_dir, fn), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fn
            total += tensors[n].numel() * tensors[n].element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def export(slices_by_dir: Dict[str, list], work_dir: str, shard_bytes: int = SHARD_BYTES,
           hf_configs: Optional[Dict[str, object]] = None) -> None:
    """Collective: every rank passes {output directory: its slices}; rank 0 writes the directories.
    `hf_configs` (rank 0): {directory: a transformers config to save beside the weights}."""
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    parts = os.path.join(work_dir, ".export_parts")
    os.makedirs(parts, exist_ok=True)
    torch.save({d: [(n, dim, a, b, t.detach().cpu().contiguous()) for n, dim, a, b, t in s]
                for d, s in slices_by_dir.items()}, os.path.join(parts, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        loaded = [torch.load(os.path.join(parts, f), mmap=True) for f in sorted(os.listdir(parts))]
        for out_dir in sorted({d for part in loaded for d in part}):
            pieces = defaultdict(list)
            for part in loaded:
                for n, dim, a, b, t in part.get(out_dir, []):
                    pieces[n].append((dim, a, b, t))
            write_safetensors_dir(out_dir, {n: assemble(p) for n, p in pieces.items()}, shard_bytes)
            if hf_configs and out_dir in hf_configs:
                hf_configs[out_dir].save_pretrained(out_dir)
        shutil.rmtree(parts)
    if dist.is_initialized():
        dist.barrier()
