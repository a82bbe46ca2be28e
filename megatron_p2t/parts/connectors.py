"""The connectors this system has: Prot2Text-V2's projector (`mlp`), LLaVA's `mlp2x_gelu`, Protein2Text's
Perceiver `resampler` (+ mlp2x_gelu), and `none` (a decoder-only recipe). Torch and megatron-core are imported
when a part is built or converted, so configs load without them."""
from __future__ import annotations

import dataclasses

from megatron_p2t.parts.registry import ConnectorAdapter, ConnectorSpec, register


def _per_token(residues: int, _model_cfg) -> int:
    return residues + 2                      # residues, <cls>, <eos>: one vector per ESM token


def _per_token_source(name: str):
    return lambda _model_cfg, residues: f"data.max_protein_residues={residues} (+2 slots, model.connector={name})"


def _tokens_kept(module, states, mask):
    return module(states), mask.bool()


def _takes_mask(module, states, mask):
    return module(states, mask)


# -- mlp: Prot2Text-V2's projector -------------------------------------------------------------------------------

def _build_projector(inputs):
    from megatron_p2t.models.projector import Projector
    return Projector(inputs.projector, inputs.config)


def _projector_tensors(src, module, tp_rank, tp, prefix=""):
    from megatron_p2t.checkpoint import projector_hf
    return projector_hf.tensors(src, module.cfg, tp_rank, tp, prefix)


def _projector_slices(module, tp_rank, tp, sd=None):
    from megatron_p2t.checkpoint import projector_hf
    return projector_hf.hf_slices(module, module.cfg, tp_rank, tp, sd=sd)


def _projector_config(module, _esm_dim, _llm_dim) -> dict:
    return {"model_type": "megatron_p2t_projector", **dataclasses.asdict(module.cfg)}


def _load_projector(path: str):
    from megatron_p2t.hf.connector import Projector
    return Projector.from_pretrained(path)


def _projector_params(model_cfg, esm_hidden, llm_hidden, tp) -> float:
    inter = model_cfg.projector.intermediate_dim
    return (esm_hidden * inter + inter + inter * llm_hidden + llm_hidden) / tp   # as the planner has always counted


MLP = register(ConnectorSpec(
    name="mlp", summary="Prot2Text-V2's projector, per ESM token (L + 2 slots: residues, <cls>, <eos>)",
    slots=_per_token, slots_source=_per_token_source("mlp"), build=_build_projector, run=_tokens_kept,
    adapter=ConnectorAdapter("projector", _projector_tensors, _projector_slices, _projector_config,
                             _load_projector, _tokens_kept),
    params=_projector_params, split=lambda m: m.projector.intermediate_dim, card="nonlinear projector",
    hscale=True, p2tv2=True))


# -- mlp2x_gelu and resampler: LLaVA's / Protein2Text's released names (model.mm_projector, model.mm_resampler) --

def _build_mlp2x(inputs):
    from megatron_p2t.models.resampler import MLP2xGelu
    return MLP2xGelu(inputs.esm_hidden, inputs.llm_hidden, inputs.config)


def _build_resampler(inputs):
    from megatron_p2t.models.resampler import ResamplerConnector
    return ResamplerConnector(inputs.model.resampler, inputs.esm_hidden, inputs.llm_hidden, inputs.config)


def _released_tensors(src, module, tp_rank, tp, prefix=""):
    from megatron_p2t.checkpoint import resampler_hf
    return resampler_hf.tensors(src, module, tp_rank, tp)


def _released_slices(module, tp_rank, tp, sd=None):
    from megatron_p2t.checkpoint import resampler_hf
    return resampler_hf.hf_slices(module, tp_rank, tp, sd)


def _released_config(kind: str):
    def config(module, esm_dim, llm_dim) -> dict:
        from megatron_p2t.checkpoint import resampler_hf
        res = getattr(module, "resampler", None)
        return resampler_hf.config(kind, esm_dim, llm_dim, res.cfg if res is not None else None)
    return config


def _load_released(path: str):
    from megatron_p2t.hf.connector import Connector
    return Connector.from_pretrained(path)


def _mlp2x_params(_model_cfg, esm_hidden, llm_hidden, tp) -> float:
    d, h = esm_hidden, llm_hidden
    return (d * h + h + h * h) / tp + h


def _resampler_params(model_cfg, esm_hidden, llm_hidden, tp) -> float:
    d, r = esm_hidden, model_cfg.resampler
    inner = r.heads * r.head_dim
    layer = 3 * 2 * d + (3 * d * inner + inner * d + 2 * d * d * r.ff_mult) / tp   # 3 LayerNorms; q, kv, out, ff
    return r.latents * d + d + 2 * d + r.depth * layer + _mlp2x_params(model_cfg, esm_hidden, llm_hidden, tp)


def _check_resampler(model_cfg) -> None:
    for k, v in dataclasses.asdict(model_cfg.resampler).items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"model.resampler.{k}={v!r}: a positive whole number")


MLP2X_GELU = register(ConnectorSpec(
    name="mlp2x_gelu", summary="LLaVA's Linear-GELU-Linear, per ESM token (L + 2 slots)",
    slots=_per_token, slots_source=_per_token_source("mlp2x_gelu"), build=_build_mlp2x, run=_tokens_kept,
    adapter=ConnectorAdapter("connector", _released_tensors, _released_slices, _released_config("mlp2x_gelu"),
                             _load_released, _takes_mask),
    params=_mlp2x_params, card="Linear-GELU-Linear connector"))

RESAMPLER = register(ConnectorSpec(
    name="resampler",
    summary="Protein2Text: Perceiver resampler over the residues, then mlp2x_gelu (model.resampler.latents slots)",
    slots=lambda _residues, model_cfg: model_cfg.resampler.latents,
    slots_source=lambda m, _residues: f"model.resampler.latents={m.resampler.latents}",
    build=_build_resampler, run=_takes_mask,
    adapter=ConnectorAdapter("connector", _released_tensors, _released_slices, _released_config("resampler"),
                             _load_released, _takes_mask),
    params=_resampler_params, split=lambda m: m.resampler.heads,
    card="Perceiver resampler + Linear-GELU-Linear connector (Protein2Text)",
    recipe=lambda m: {f"model.resampler.{k}": v for k, v in dataclasses.asdict(m.resampler).items()},
    check=_check_resampler, info=lambda m: {"resampler": dataclasses.asdict(m.resampler)}))

NONE = register(ConnectorSpec(
    name="none", summary="no connector (decoder-only, with model.encoder=none): no prompt slots",
    slots=lambda _residues, _model_cfg: 0))
