"""Plain settings of the model parts (no megatron import), so configs load without the training stack."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ProjectorConfig:
    input_dim: int = 2560          # ESM hidden size (0: take it from the ESM checkpoint)
    intermediate_dim: int = 2048
    output_dim: int = 4096         # LLM hidden size (0: take it from the LLaMA checkpoint)
    activation: str = "gelu"
    dropout: float = 0.1
    l2_normalize: bool = True


@dataclasses.dataclass
class FreezeConfig:
    esm: bool = True
    projector: bool = False
    llm: bool = True
