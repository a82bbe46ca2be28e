"""Plain settings of the model parts (no megatron import), so configs load without the training stack."""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

PROJECTOR_DROPOUT = 0.1   # when neither the config nor a published checkpoint sets one


@dataclasses.dataclass
class ProjectorConfig:
    input_dim: int = 2560          # ESM hidden size (0: take it from the ESM checkpoint)
    intermediate_dim: int = 2048
    output_dim: int = 4096         # LLM hidden size (0: take it from the LLaMA checkpoint)
    activation: str = "gelu"
    # None: the published checkpoint's own (Prot2Text-V2: adapter_config.dropout_rate) when the model comes from
    # one, else PROJECTOR_DROPOUT; parts/assemble.py resolves it and says which it took
    dropout: Optional[float] = None
    l2_normalize: bool = True


@dataclasses.dataclass(frozen=True)
class ConnectorInputs:
    """What a connector is built from: the model config, the projector section with its dims filled in (from the
    checkpoints), the two widths, and the decoder's megatron TransformerConfig (dtype, tensor parallelism)."""
    model: Any
    projector: Any
    esm_hidden: int
    llm_hidden: int
    config: Any


@dataclasses.dataclass
class ResamplerConfig:
    """Protein2Text's Perceiver resampler (models/resampler.py), at the ESM width."""
    latents: int = 128
    depth: int = 2
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 2


@dataclasses.dataclass
class StructureConfig:
    """The structure-aware encoder's distance bias (models/esm_structure.py), model.encoder=esm2_structure."""
    kernels: int = 128             # Gaussian basis kernels over C-alpha distances
    max_distance: float = 32.0     # initial kernel centres spread over 0..max_distance angstrom
    embed_scale: float = 0.01      # the summed distance features' weight in the token embeddings
    dropout: float = 0.15          # training: a protein's structure is left out with this probability
    chunk: int = 128               # query rows of the [L, L, kernels] expansion computed at a time
    noise_std: float = 1.0         # warm-up: angstrom of Gaussian noise the denoising head predicts


@dataclasses.dataclass
class MoEConfig:
    """model.decoder=llama_moe: megatron-core's MoE layer in place of each decoder MLP (models/llama_moe.py).
    Routing is Switch-style top-k over softmax scores taken before the top-k (megatron-core requires this for
    top-1: renormalising one score would give 1 and leave the router without a gradient from the loss)."""
    experts: int = 4
    top_k: int = 1
    capacity_factor: Optional[float] = 1.25   # training only (tokens over capacity dropped); None: no dropping
    aux_loss: float = 0.01                    # load-balancing loss coefficient (Switch / GShard)
    # upcycling: router weights ~ N(0, router_init_std^2). Small, so every score is 1/experts within ~1e-7 and the
    # upcycled layer (experts' down projections x experts) computes the dense MLP; not zero, so tokens still
    # spread over the experts (equal scores would send every token to expert 0 and drop most of them)
    router_init_std: float = 1e-7
    seed: int = 0                             # the router's initial values, independent of the parallel layout
    dispatcher: str = "auto"                  # megatron token dispatcher: auto (alltoall on GPU, allgather on CPU)


@dataclasses.dataclass
class RecomputeConfig:
    """Activation recompute in the decoder, megatron-core's (recompute_granularity / _method / _num_layers).
    granularity full: a recomputed chunk of layers keeps only its input and runs its forward again in backward.
    method uniform: every chunk of num_layers layers is recomputed (num_layers divides each pipeline stage's
    layers); block: the first num_layers layers of each pipeline stage, the others keep their activations.
    megatron-core's selective recompute (core attention) would save nothing here: our attention kernels keep no
    [s, s] scores."""
    granularity: str = "none"                 # none | full
    method: str = "uniform"                   # uniform | block
    num_layers: int = 1
    # every ESM layer too, where a step takes gradients through ESM (stage-1 ESM LoRA, a trained distance bias)
    encoder: bool = False


RECOMPUTE_GRANULARITIES = ("none", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def check_recompute(rc: RecomputeConfig) -> None:
    """The decoder's recompute settings alone (a decoder part adds its own: parts/decoders.py)."""
    if rc.granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"model.recompute.granularity={rc.granularity!r}: none, or full (each recomputed chunk of "
                         f"layers keeps only its input; megatron-core's selective recompute saves nothing beside "
                         f"our attention kernels)")
    if rc.method not in RECOMPUTE_METHODS:
        raise ValueError(f"model.recompute.method={rc.method!r}: uniform (every chunk of num_layers layers) or "
                         f"block (the first num_layers layers of each pipeline stage)")
    if rc.num_layers < 1:
        raise ValueError(f"model.recompute.num_layers={rc.num_layers}: at least 1")


def check_moe(moe: MoEConfig, expert_parallel: int = 1) -> None:
    """The MoE settings alone and against parallel.expert: refused before anything is built."""
    for k in ("experts", "top_k"):
        v = getattr(moe, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"model.moe.{k}={v!r}: a positive whole number")
    if moe.experts < 2:
        raise ValueError(f"model.moe.experts={moe.experts}: a mixture needs at least 2 experts (or use "
                         f"model.decoder=llama)")
    if moe.top_k > moe.experts:
        raise ValueError(f"model.moe.top_k={moe.top_k} is more than model.moe.experts={moe.experts}: a token cannot go "
                         f"to more experts than there are; lower top_k or add experts")
    if moe.capacity_factor is not None and not moe.capacity_factor > 0:
        raise ValueError(f"model.moe.capacity_factor={moe.capacity_factor}: positive (1.25 drops tokens beyond 1.25x "
                         f"an even share), or null for no dropping")
    if moe.aux_loss < 0 or moe.router_init_std < 0:
        raise ValueError("model.moe.aux_loss and model.moe.router_init_std must be non-negative")
    if moe.dispatcher not in ("auto", "alltoall", "allgather"):
        raise ValueError(f"model.moe.dispatcher={moe.dispatcher!r}: auto, alltoall or allgather")
    if moe.experts % expert_parallel:
        lower = [d for d in range(1, moe.experts + 1) if moe.experts % d == 0 and d <= expert_parallel]
        raise ValueError(f"model.moe.experts={moe.experts} is not divisible by parallel.expert={expert_parallel}: each "
                         f"expert-parallel rank holds the same number of experts; set parallel.expert to a divisor "
                         f"of {moe.experts} (e.g. {lower[-1]}) or model.moe.experts to a multiple of {expert_parallel}")


@dataclasses.dataclass
class FreezeConfig:
    esm: bool = True
    connector: bool = False        # whichever connector the recipe has (was freeze.projector)
    llm: bool = True
    # the structure-aware encoder's distance bias (no pretrained ESM-2 has one): trained with the connector
    structure: bool = False


# model.llm_lora.modules_to_save: the decoder modules that can be trained fully, and their names in PEFT's layout
SAVABLE = {"embedding": "embed_tokens", "output_layer": "lm_head"}


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters on megatron-core linears, named by their attribute in the layer (linear_qkv,
    linear_proj, linear_fc1, linear_fc2). r = 0 turns LoRA off."""
    r: int = 0
    alpha: float = 0.0             # 0: 2 * r (Prot2Text-V2)
    dropout: float = 0.1
    targets: List[str] = dataclasses.field(default_factory=lambda: ["linear_qkv", "linear_proj"])
    seed: int = 0                  # A's initial values, independent of the parallel layout
    # modules trained fully beside the adapters (PEFT's modules_to_save): the decoder's `embedding` and
    # `output_layer` (ProLLaMA's stage 1 trains embed_tokens and lm_head), vocabulary-parallel under TP
    modules_to_save: List[str] = dataclasses.field(default_factory=list)

    @property
    def scale(self) -> float:
        return (self.alpha or 2.0 * self.r) / self.r
