"""The protein encoders: ESM-2 (`esm2`), ESM-2 with C-alpha distances as attention biases (`esm2_structure`,
SEPIT), and `none` (a decoder-only recipe reads proteins as text)."""
from __future__ import annotations

from megatron_p2t.parts.registry import EncoderSpec, register


def _build_esm(esm_cfg, model_cfg, **kw):
    from megatron_p2t.models.esm import ESMEncoder
    return ESMEncoder(esm_cfg, output_layer=model_cfg.esm_output_layer, **kw)


def _build_structure(esm_cfg, model_cfg, **kw):
    from megatron_p2t.models.esm_structure import StructureESMEncoder
    return StructureESMEncoder(esm_cfg, model_cfg.structure, output_layer=model_cfg.esm_output_layer, **kw)


def _check_structure(model_cfg) -> None:
    s = model_cfg.structure
    for k in ("kernels", "chunk"):
        if not isinstance(getattr(s, k), int) or getattr(s, k) < 1:
            raise ValueError(f"model.structure.{k}={getattr(s, k)!r}: a positive whole number")
    if not 0.0 <= s.dropout < 1.0:
        raise ValueError(f"model.structure.dropout={s.dropout}: a probability in [0, 1)")
    if s.max_distance <= 0 or s.noise_std < 0:
        raise ValueError("model.structure.max_distance must be positive and noise_std non-negative")


ESM2 = register(EncoderSpec(name="esm2", summary="ESM-2 (facebook/esm2_*), hidden states of model.esm_output_layer",
                            build=_build_esm))

ESM2_STRUCTURE = register(EncoderSpec(
    name="esm2_structure",
    summary="ESM-2 with C-alpha distances as per-head attention biases (SEPIT; model.structure), reading "
            "KEY.coords.npy from shards built with --structures; plain ESM-2 without them",
    structure=True, build=_build_structure, recipe=lambda m: {"model.structure.kernels": m.structure.kernels},
    check=_check_structure))

NONE = register(EncoderSpec(
    name="none", summary="no protein encoder: a decoder-only recipe reads proteins as text (ProLLaMA's Seq=<...>)",
    reads_protein=False))
