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
class ResamplerConfig:
    """Protein2Text's Perceiver resampler (models/resampler.py), at the ESM width."""
    latents: int = 128
    depth: int = 2
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 2


# model.encoder / model.decoder: the protein encoder and the language model (more come with later recipes)
ENCODERS = {"esm2": "ESM-2 (facebook/esm2_*), hidden states of model.esm_output_layer"}
DECODERS = {"llama": "LLaMA-3 (meta-llama/Llama-3.1-8B-Instruct and its sizes)"}

# model.connector: how the ESM states become decoder inputs, and so how many prompt slots a protein takes
CONNECTORS = {
    "mlp": "Prot2Text-V2's projector, per ESM token (L + 2 slots: residues, <cls>, <eos>)",
    "mlp2x_gelu": "LLaVA's Linear-GELU-Linear, per ESM token (L + 2 slots)",
    "resampler": "Protein2Text: Perceiver resampler over the residues, then mlp2x_gelu (model.resampler.latents slots)",
}


def check_parts(encoder: str, connector: str, decoder: str) -> None:
    for key, name, known in (("encoder", encoder, ENCODERS), ("connector", connector, CONNECTORS),
                             ("decoder", decoder, DECODERS)):
        if name not in known:
            raise ValueError(f"model.{key}={name!r} is not a part this system has; choose one of "
                             + "; ".join(f"{k} ({v})" for k, v in known.items()))


def protein_slots(connector: str, resampler: ResamplerConfig, residues: int) -> int:
    """Prompt positions one protein of `residues` residues fills: what prompt building, packing, generation and
    the planner ask instead of assuming L + 2."""
    if connector == "resampler":
        return resampler.latents
    if connector in CONNECTORS:
        return residues + 2
    raise ValueError(f"model.connector={connector!r}: choose one of {sorted(CONNECTORS)}")


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
