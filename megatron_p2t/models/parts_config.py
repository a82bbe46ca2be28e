"""Plain settings of the model parts (no megatron import), so configs load without the training stack."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

PROJECTOR_DROPOUT = 0.1   # when neither the config nor a published checkpoint sets one


@dataclasses.dataclass
class ProjectorConfig:
    input_dim: int = 2560          # ESM hidden size (0: take it from the ESM checkpoint)
    intermediate_dim: int = 2048
    output_dim: int = 4096         # LLM hidden size (0: take it from the LLaMA checkpoint)
    activation: str = "gelu"
    # None: the published checkpoint's own (Prot2Text-V2: adapter_config.dropout_rate) when the model comes from
    # one, else PROJECTOR_DROPOUT; checkpoint/load.py resolves it and says which it took
    dropout: Optional[float] = None
    l2_normalize: bool = True


@dataclasses.dataclass
class FreezeConfig:
    esm: bool = True
    projector: bool = False
    llm: bool = True


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters on megatron-core linears, named by their attribute in the layer (linear_qkv,
    linear_proj, linear_fc1, linear_fc2). r = 0 turns LoRA off."""
    r: int = 0
    alpha: float = 0.0             # 0: 2 * r (Prot2Text-V2)
    dropout: float = 0.1
    targets: List[str] = dataclasses.field(default_factory=lambda: ["linear_qkv", "linear_proj"])
    seed: int = 0                  # A's initial values, independent of the parallel layout

    @property
    def scale(self) -> float:
        return (self.alpha or 2.0 * self.r) / self.r
