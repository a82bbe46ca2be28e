"""Protein2Text's connector in the released layout (LLaVA's `model.mm_resampler.*` -- Flamingo's
PerceiverResampler -- and `model.mm_projector.{0,2}.*`) to and from models/resampler.py's tensors for a
tensor-parallel rank. One table serves both directions."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from megatron_p2t.checkpoint import export_hf
from megatron_p2t.checkpoint.slicing import Entry, Slice, read, span, stack_rows, write

RESAMPLER, PROJECTOR = "model.mm_resampler.", "model.mm_projector."
CONFIG_TYPE = "megatron_p2t_connector"     # connector/config.json's model_type (hf/connector.py reads it)


def _layer(i: int):
    m, h = f"resampler.layers.{i}.", f"layers.{i}."
    return (Entry(m + "norm_media.weight", (h + "0.norm_media.weight",)),
            Entry(m + "norm_media.bias", (h + "0.norm_media.bias",)),
            Entry(m + "norm_latents.weight", (h + "0.norm_latents.weight",)),
            Entry(m + "norm_latents.bias", (h + "0.norm_latents.bias",)),
            Entry(m + "linear_q.weight", (h + "0.to_q.weight",), 0, ("heads",)),
            # to_kv is [k of every head; v of every head]: a rank holds its heads' rows of both halves
            Entry(m + "linear_kv.weight", (h + "0.to_kv.weight", h + "0.to_kv.weight"), 0, ("k", "v"), "rows"),
            Entry(m + "linear_proj.weight", (h + "0.to_out.weight",), 1, ("heads",)),
            Entry(m + "norm_ff.weight", (h + "1.0.weight",)), Entry(m + "norm_ff.bias", (h + "1.0.bias",)),
            Entry(m + "linear_fc1.weight", (h + "1.1.weight",), 0, ("ff",)),
            Entry(m + "linear_fc2.weight", (h + "1.3.weight",), 1, ("ff",)))


def _resampler_table(depth: int):
    return (Entry("resampler.latents", ("latents",)), Entry("resampler.media_pos", ("media_pos_emb",), fuse="pos"),
            Entry("resampler.norm.weight", ("norm.weight",)), Entry("resampler.norm.bias", ("norm.bias",)),
            *[e for i in range(depth) for e in _layer(i)])


MLP = (Entry("linear_fc1.weight", ("0.weight",), 0, ("llm",)), Entry("linear_fc1.bias", ("0.bias",), 0, ("llm",)),
       Entry("linear_fc2.weight", ("2.weight",), 1, ("llm",)), Entry("linear_fc2.bias", ("2.bias",)))


def _layout(connector, tp_rank: int, tp: int):
    """(resampler table or (), the mlp's prefix in the module, spans, fusers) of a ResamplerConnector or a lone
    MLP2xGelu (`mlp2x_gelu`: LLaVA's mm_projector without a resampler)."""
    res = getattr(connector, "resampler", None)
    mlp = connector.mlp if res is not None else connector
    llm_dim, esm_dim = mlp.linear_fc2.weight.shape[0], mlp.linear_fc1.weight.shape[1]
    spans = {"llm": span(llm_dim, tp_rank, tp, "LLM hidden size")}
    # the released media_pos_emb is [rows, 1, dim] of which its forward adds row 0 (one "time" per protein);
    # written back as that row repeated llm_dim times (the released shape), which computes the same
    fusers = {"rows": (stack_rows, lambda t: list(t.chunk(2, 0))),
              "pos": (lambda parts: parts[0][0].reshape(-1),
                      lambda t: [t.reshape(1, 1, -1).expand(llm_dim, 1, -1).contiguous()])}
    if res is None:
        return (), "", spans, fusers
    cfg = res.cfg
    inner = cfg.heads * cfg.head_dim
    heads = span(inner, tp_rank, tp, "model.resampler heads x head_dim")
    spans.update(heads=heads, k=heads, v=(inner + heads[0], inner + heads[1]),
                 ff=span(esm_dim * cfg.ff_mult, tp_rank, tp, "resampler feed-forward width"))
    return _resampler_table(cfg.depth), "mlp.", spans, fusers


def tensors(src, connector, tp_rank: int, tp: int) -> Dict[str, torch.Tensor]:
    """This rank's tensors of `connector` (its shapes: ResamplerConnector or MLP2xGelu) from a directory (HFDir /
    TensorSource) in the released names."""
    resampler, mlp_prefix, spans, fusers = _layout(connector, tp_rank, tp)
    return {**read(resampler, src, RESAMPLER, "", spans, fusers), **read(MLP, src, PROJECTOR, mlp_prefix, spans,
                                                                          fusers)}


def hf_slices(connector, tp_rank: int, tp: int, sd: Optional[Dict[str, torch.Tensor]] = None) -> List[Slice]:
    """The inverse: this rank's share of the released tensors; of `sd` (tensor-parallel rank tp_rank's state
    dict of a connector shaped as this one, e.g. from a checkpoint) instead of the module's own when given."""
    resampler, mlp_prefix, spans, fusers = _layout(connector, tp_rank, tp)
    sd = connector.state_dict() if sd is None else sd
    return write(resampler, sd, RESAMPLER, "", spans, tp_rank, fusers) + write(MLP, sd, PROJECTOR, mlp_prefix,
                                                                                spans, tp_rank, fusers)


def whole(shards: List[Dict[str, torch.Tensor]], connector) -> Dict[str, torch.Tensor]:
    """The released tensors, whole, from the connector's state dicts of every tensor-parallel rank of a run
    (its checkpoint's files, in rank order): what `tensors` then reads at another run's layout."""
    return export_hf.whole(s for rank, sd in enumerate(shards) for s in hf_slices(connector, rank, len(shards), sd))


def config(kind: str, esm_dim: int, llm_dim: int, resampler) -> dict:
    """connector/config.json of an export: what hf_connector.Connector is rebuilt from."""
    return {"model_type": CONFIG_TYPE, "connector": kind, "esm_dim": esm_dim, "llm_dim": llm_dim,
            **({"resampler": dataclasses.asdict(resampler)} if resampler is not None else {})}
