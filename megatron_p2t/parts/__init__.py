"""Parts as specs: the encoders, connectors and decoders a recipe names, in one registry (registry.py), and the
rules that join them. `docs/architecture.md` says how to add one.

    from megatron_p2t import parts
    enc, con, dec = parts.of(cfg.model)           # the three specs a model config names
    parts.slots(cfg.model, residues)              # prompt positions one protein fills
"""
from __future__ import annotations

from typing import Tuple

from megatron_p2t.parts import connectors, decoders, encoders  # noqa: F401  (the built-in parts register)
from megatron_p2t.parts.registry import (CONNECTORS, DECODERS, ENCODERS, ConnectorAdapter, ConnectorInputs,
                                         ConnectorSpec, DecoderSpec, EncoderSpec, connector, decoder, encoder,
                                         import_parts, register)

__all__ = ["CONNECTORS", "DECODERS", "ENCODERS", "ConnectorAdapter", "ConnectorInputs", "ConnectorSpec",
           "DecoderSpec", "EncoderSpec", "connector", "decoder", "encoder", "import_parts", "register", "of",
           "slots", "check", "check_room", "align_objective", "ALIGN_OBJECTIVES", "recipe_keys"]


def of(model_cfg) -> Tuple[EncoderSpec, ConnectorSpec, DecoderSpec]:
    """The (encoder, connector, decoder) specs a model config names; an unknown name is refused with the list."""
    return encoder(model_cfg.encoder), connector(model_cfg.connector), decoder(model_cfg.decoder)


def slots(model_cfg, residues: int) -> int:
    """Prompt positions one protein of `residues` residues fills: what prompt building, packing, generation and
    the planner ask instead of assuming L + 2."""
    return connector(model_cfg.connector).slots(residues, model_cfg)


def check(model_cfg, parallel) -> None:
    """The parts a model config names, their own settings, and how they fit together and the layout."""
    enc, con, dec = of(model_cfg)
    if enc.reads_protein != (con.build is not None):
        raise ValueError(f"model.encoder={enc.name} with model.connector={con.name}: a decoder-only recipe sets "
                         f"both to none, a recipe with a protein encoder neither")
    for spec in (enc, con, dec):
        spec.check(model_cfg)
    dec.check_parallel(model_cfg, parallel)


def recipe_keys(model_cfg) -> dict:
    """What a checkpoint's tensors depend on beyond their shapes: the parts and their settings that change what
    the tensors mean (config.check_same_recipe compares them)."""
    enc, con, dec = of(model_cfg)
    out = {"model.encoder": enc.name, "model.connector": con.name, "model.decoder": dec.name,
           "model.esm_output_layer": model_cfg.esm_output_layer}
    for spec in (con, enc, dec):
        out.update(spec.recipe(model_cfg))
    return out


def check_room(model_cfg, max_residues: int, max_text_tokens: int, decoder_positions: int, source: str) -> None:
    """The longest sample (the protein's prompt slots and the answer) must fit the decoder's positions."""
    n = slots(model_cfg, max_residues)
    if n + max_text_tokens >= decoder_positions:
        con = connector(model_cfg.connector)
        what = con.slots_source(model_cfg, max_residues) if con.slots_source else f"model.connector={con.name}'s {n}"
        raise ValueError(f"{what} prompt slots + data.max_text_tokens={max_text_tokens} do not fit the decoder "
                         f"{source}, which has {decoder_positions} positions (max_position_embeddings); lower "
                         f"them")


# align.objective: what stage 1 (`megatron-p2t align`) trains the connector (or, decoder-only, the decoder) with
ALIGN_OBJECTIVES = {
    "hscale": "Prot2Text-V2's H-SCALE: mean/std-pooled projector outputs against the frozen LLaMA's pooled text "
              "states, InfoNCE with negatives gathered over data-parallel ranks (model.connector=mlp only)",
    "feature": "LLaVA's feature alignment (Protein2Text's pretraining): next-token loss on the function text through "
               "the frozen decoder, the connector alone trained",
    "lm": "continual pretraining of the decoder on protein sequences as text (ProLLaMA's stage 1, `pretrain-lm`): "
          "documents packed with attention confined to each, LoRA + model.llm_lora.modules_to_save",
}


def align_objective(objective: str, model_cfg) -> str:
    """align.objective resolved: `auto` is H-SCALE for a connector H-SCALE pools (Prot2Text-V2's projector),
    language modelling for a decoder-only recipe, feature alignment otherwise."""
    con = connector(model_cfg.connector)
    decoder_only = con.build is None
    if objective == "auto":
        return "lm" if decoder_only else "hscale" if con.hscale else "feature"
    if objective not in ALIGN_OBJECTIVES:
        raise ValueError(f"align.objective={objective!r}: choose auto or one of "
                         + "; ".join(f"{k} ({v})" for k, v in ALIGN_OBJECTIVES.items()))
    if (objective == "lm") != decoder_only:
        raise ValueError(f"align.objective={objective} with model.connector={con.name}: language-model pretraining "
                         f"is the decoder-only recipe's stage 1 (model.encoder=none, model.connector=none), and a "
                         f"recipe with a connector aligns it (hscale or feature)")
    if objective == "hscale" and not con.hscale:
        raise ValueError(f"align.objective=hscale pools Prot2Text-V2's projector, which model.connector={con.name} "
                         f"does not have; use align.objective=feature (or auto), or model.connector=mlp")
    return objective
