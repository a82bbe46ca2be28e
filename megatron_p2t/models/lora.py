"""LoRA on megatron-core's tensor-parallel linears, sharded the way the base layer is.

Column-parallel base (weight [out/tp, in], input replicated): A [r, in] is replicated, B [out/tp, r] is split
like the base's output. A's output passes through `copy_to_tensor_model_parallel_region` (identity forward,
all-reduce backward), so A gets the gradient from every rank's slice of B, the same on every rank.
Row-parallel base (weight [out, in/tp], input split): A [r, in/tp] is split like the input, B [out, r] is
replicated; A's partial products are summed by `reduce_from_tensor_model_parallel_region` before B.
A's initial values come from a generator seeded by (seed, layer name) and are sliced per rank, and B starts
at zero, so every layout starts from the same adapter and TP=2 trains like TP=1.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, List

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch import nn

from megatron_p2t.models.parts_config import LoRAConfig


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, cfg: LoRAConfig, name: str):
        super().__init__()
        if getattr(base.config, "sequence_parallel", False):
            raise NotImplementedError(f"{name}: LoRA with sequence_parallel=True is not supported; turn one off")
        if isinstance(base, ColumnParallelLinear):
            self.kind = "column"
        elif isinstance(base, RowParallelLinear):
            self.kind = "row"
        else:
            raise TypeError(f"{name}: LoRA needs a megatron-core Column/RowParallelLinear, got {type(base).__name__}")
        self.base, self.scale, self.r = base, cfg.scale, cfg.r
        for p in base.parameters():
            p.requires_grad_(False)
        tp, rank = base.tp_group.size(), base.tp_group.rank()  # the base layer's own tensor-parallel group
        out_local, in_local = base.weight.shape
        dtype = base.weight.dtype
        in_full = in_local * tp if self.kind == "row" else in_local
        g = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{name}".encode()))
        bound = 1.0 / math.sqrt(in_full)  # nn.Linear's default (kaiming_uniform with a=sqrt(5)), as PEFT
        a = (torch.rand(cfg.r, in_full, generator=g) * 2 - 1) * bound
        if self.kind == "row":
            a = a[:, rank * in_local:(rank + 1) * in_local]
        self.lora_A = nn.Parameter(a.to(dtype=dtype, device=base.weight.device).contiguous())
        self.lora_B = nn.Parameter(torch.zeros(out_local, cfg.r, dtype=dtype, device=base.weight.device))
        # replicated parameters: megatron's grad-norm and DDP code must not treat them as split
        for p, split in ((self.lora_A, self.kind == "row"), (self.lora_B, self.kind == "column")):
            p.tensor_model_parallel = split
            p.partition_dim = (1 if self.kind == "row" else 0) if split else -1
            p.partition_stride = 1
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        if self.kind == "column":  # replicated input: the default generator draws the same mask on TP peers
            h = copy_to_tensor_model_parallel_region(nn.functional.linear(self.dropout(x), self.lora_A))
        else:
            xd = x
            if self.training and self.dropout.p > 0:
                with get_cuda_rng_tracker().fork():  # each rank drops its own slice of the split input
                    xd = self.dropout(x)
            h = reduce_from_tensor_model_parallel_region(nn.functional.linear(xd, self.lora_A))
        return out + nn.functional.linear(h, self.lora_B) * self.scale, bias

    @property
    def weight(self):  # megatron code that inspects the layer (dtype, device, shape) sees the base weight
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """This rank's shard of scale * B @ A, shaped like the base weight's shard."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scale).to(self.base.weight.dtype)


def apply_lora(model: nn.Module, cfg: LoRAConfig, prefix: str = "") -> List[str]:
    """Wrap every submodule whose attribute name is in cfg.targets; returns the wrapped names. As PEFT does, every
    existing parameter of `model` is frozen: its only trainable parameters are the new lora_A / lora_B, and those
    of the modules named in cfg.modules_to_save (this pipeline stage's, when it holds them), trained fully."""
    if cfg.r <= 0:
        return []
    for p in model.parameters():
        p.requires_grad_(False)
    for name in cfg.modules_to_save:
        for p in getattr(model, name).parameters() if getattr(model, name, None) is not None else ():
            p.requires_grad_(True)
    wrapped = []
    for name, module in list(model.named_modules()):
        if ".experts." in f".{name}.":   # a mixture of experts' MLPs train fully (models/llama_moe.py), unadapted
            continue
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and not isinstance(child, LoRALinear):
                full = ".".join(p for p in (prefix, name, child_name) if p)
                setattr(module, child_name, LoRALinear(child, cfg, _global_name(model, prefix, name, child_name)))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"LoRA targets {cfg.targets} match no layer of {type(model).__name__}")
    return wrapped


def _global_name(model: nn.Module, prefix: str, name: str, child_name: str) -> str:
    """The layer's name with a pipeline stage's local layer index replaced by the global one (megatron's
    1-based layer_number), so A's initial values do not depend on the pipeline layout either."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            layer = model.get_submodule(".".join(parts[:i + 2]))
            if hasattr(layer, "layer_number"):
                parts[i + 1] = str(layer.layer_number - 1)
    return ".".join(p for p in (prefix, ".".join(parts), child_name) if p)


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the base layer back (for exports and inference):
    afterwards the model has the unwrapped names and shapes. Returns the number of layers merged."""
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight.add_(child.delta())
                setattr(module, child_name, child.base)
                n += 1
    return n
