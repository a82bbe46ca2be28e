"""The modality projector as megatron-core tensor-parallel layers.

Prot2Text-V2's adapter: Linear(esm -> 2048) -> GELU -> dropout -> Linear(2048 -> llm) -> GELU -> dropout, then
each token's vector L2-normalised. The first linear is column-parallel (its output stays split across
tensor-parallel ranks), the second row-parallel (it consumes the split and all-reduces), so the pair costs one
all-reduce, like a transformer MLP. Depth and activation come from the config (`mlp2x_gelu` in LLaVA's terms
is depth 2 with GELU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_p2t.models.parts_config import PROJECTOR_DROPOUT, ProjectorConfig

_ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class Projector(MegatronModule):
    def __init__(self, cfg: ProjectorConfig, transformer_config):
        super().__init__(transformer_config)
        self.cfg = cfg
        init = transformer_config.init_method
        self.fc1 = ColumnParallelLinear(cfg.input_dim, cfg.intermediate_dim, config=transformer_config,
                                        init_method=init, bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(cfg.intermediate_dim, cfg.output_dim, config=transformer_config,
                                     init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False)
        self.act = _ACTS[cfg.activation]
        self.dropout = nn.Dropout(PROJECTOR_DROPOUT if cfg.dropout is None else cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        h = self.dropout(self.act(h))
        y, _ = self.fc2(h)
        y = self.dropout(self.act(y))
        return F.normalize(y, p=2, dim=-1) if self.cfg.l2_normalize else y
