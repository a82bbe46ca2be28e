"""The registry of parts: every protein encoder, connector and decoder a recipe can name (`model.encoder`,
`model.connector`, `model.decoder`) is one spec, declared in its own module (parts/encoders.py, connectors.py,
decoders.py, or a module of the user's named in the config's `imports`) and registered here by name.

A spec says everything the rest of the system asks of its part: how it is built under a Layout, how many prompt
slots it gives a protein, its HF layout both ways (one name table), its parameter count for the planner, its
inference form for export and `generate`. Nothing else compares part names: the joined model carries its three
specs, and the builders, checkpoint adapters, stages and planner ask them (tests/parts/test_registry.py greps
for comparisons). Modules below this layer receive the specs as objects; they import nothing from here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional

from megatron_p2t.models.parts_config import ConnectorInputs  # noqa: F401  (what ConnectorSpec.build takes)


def _nothing(*_, **__):
    return None


def _no_keys(_model_cfg) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class ConnectorAdapter:
    """A connector's HF layout, one name table serving both directions, and its inference form."""
    directory: str                  # the sub-directory of an export that holds it (projector/, connector/)
    # (src: HFDir / TensorSource, module, tp_rank, tp, prefix) -> {module's tensor name: this rank's tensor}
    tensors: Callable
    # (module, tp_rank, tp, sd=None) -> [Slice]: this rank's share of the HF tensors, of `sd` (a state dict of
    # that rank shaped as `module`, e.g. from a checkpoint) instead of the module's own when given
    slices: Callable
    # (module, esm_dim, llm_dim) -> the directory's config.json
    config: Callable
    # the exported directory -> a plain-torch module (transformers + torch alone)
    load: Callable
    # (that module, states [b, L, esm], mask [b, L]) -> (vectors [b, n, llm], real [b, n]), as ConnectorSpec.run
    run: Callable


@dataclasses.dataclass(frozen=True)
class ConnectorSpec:
    """How the encoder's states become decoder inputs, and so how many prompt slots a protein takes."""
    name: str
    summary: str                    # one line, for config errors and `--help`
    # (residues of the protein, model config) -> prompt positions it fills
    slots: Callable[[int, Any], int]
    # (model config, residues) -> the settings that make the slots, for the error when they do not fit
    slots_source: Optional[Callable] = None
    # (ConnectorInputs) -> the megatron module (tensor-parallel under its config); None: no connector
    build: Optional[Callable] = None
    # (module, states [b, L, esm], mask [b, L]) -> (vectors [b, n, llm], real [b, n]); the HF form the same
    run: Optional[Callable] = None
    adapter: Optional[ConnectorAdapter] = None
    # (model config, esm hidden, llm hidden, tp) -> parameters on one tensor-parallel rank (the planner)
    params: Callable = lambda *_: 0.0
    split: Callable = lambda _m: 0  # what it splits over tensor-parallel ranks (the planner names it)
    card: str = ""                  # the export's model card: what sits between encoder and decoder
    hscale: bool = False            # H-SCALE pools its per-token outputs (align.objective=hscale, auto's choice)
    p2tv2: bool = False             # Prot2Text-V2's published layout holds it (model.p2tv2, --format p2tv2)
    recipe: Callable = _no_keys     # (model config) -> settings a checkpoint of it depends on beyond shapes
    check: Callable = _nothing      # (model config) -> raises ValueError on settings it cannot take
    # (model config) -> the settings its export records for the inference form (megatron_p2t.json)
    info: Callable = _no_keys


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    name: str
    summary: str
    reads_protein: bool = True      # False: a decoder-only recipe, whose prompt is all text
    # reads C-alpha coordinates beside the sequence (data.structure) into a distance bias (model.structure)
    structure: bool = False
    # (esm_cfg: models.esm.ESMConfig, model config, params_dtype, layout, recompute, attention_kernel) -> module
    build: Optional[Callable] = None
    recipe: Callable = _no_keys
    check: Callable = _nothing


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    name: str
    summary: str
    # (model config) -> the MoE settings megatron's TransformerConfig takes, None for a dense decoder
    moe: Callable = _nothing
    # its HF layout, both ways; moe: what `moe` gave (None for a dense decoder)
    # (module, src: HFDir / TensorSource, hf_cfg, moe, tp_rank, tp, prefix) -> {name: this rank's tensor}
    tensors: Optional[Callable] = None
    # (module, hf_cfg, moe, tp_rank, tp, ep_rank) -> [Slice]: this rank's share of the HF tensors
    slices: Optional[Callable] = None
    # (hf_cfg, moe) -> the transformers config its export writes
    hf_config: Callable = lambda hf_cfg, _moe: hf_cfg
    recipe: Callable = _no_keys
    check: Callable = _nothing
    # (model config, parallel config) -> raises ValueError on settings the layout cannot take
    check_parallel: Callable = _nothing


ENCODERS: Dict[str, EncoderSpec] = {}
CONNECTORS: Dict[str, ConnectorSpec] = {}
DECODERS: Dict[str, DecoderSpec] = {}
_TABLES = {EncoderSpec: ("encoder", ENCODERS), ConnectorSpec: ("connector", CONNECTORS),
           DecoderSpec: ("decoder", DECODERS)}


def register(spec):
    """Add a part (an EncoderSpec, ConnectorSpec or DecoderSpec) under its name; a name is taken once."""
    kind, table = _TABLES[type(spec)]
    if spec.name in table and table[spec.name] is not spec:
        raise ValueError(f"model.{kind}={spec.name!r} is registered already ({table[spec.name].summary}); give "
                         f"the new part another name")
    table[spec.name] = spec
    return spec


def _get(kind: str, table: dict, name: str):
    if name not in table:
        raise ValueError(f"model.{kind}={name!r} is not a part this system has; choose one of "
                         + "; ".join(f"{k} ({v.summary})" for k, v in table.items())
                         + " (a part of your own: register it in a module named in the config's `imports`)")
    return table[name]


def encoder(name: str) -> EncoderSpec:
    return _get("encoder", ENCODERS, name)


def connector(name: str) -> ConnectorSpec:
    return _get("connector", CONNECTORS, name)


def decoder(name: str) -> DecoderSpec:
    return _get("decoder", DECODERS, name)


def import_parts(modules) -> None:
    """Import the modules a config names in `imports` (torchtitan's custom_import): parts of a user's own
    register themselves there before any config names them."""
    for m in modules or ():
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise ValueError(f"imports: cannot import {m!r} ({e}); name a module on the Python path that "
                             f"registers parts (megatron_p2t.parts.register)") from None
