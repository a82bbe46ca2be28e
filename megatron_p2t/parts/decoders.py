"""The decoders: LLaMA-3 (`llama`) and LLaMA-3 with every MLP a mixture of experts (`llama_moe`, SEPIT)."""
from __future__ import annotations

from megatron_p2t.models.parts_config import check_moe
from megatron_p2t.parts.registry import DecoderSpec, register


def _llama_tensors(module, src, hf_cfg, _moe, tp_rank, tp, prefix=""):
    from megatron_p2t.checkpoint import llama_hf
    return llama_hf.megatron_tensors(module, src, hf_cfg, tp_rank, tp, prefix)


def _llama_slices(module, hf_cfg, _moe, tp_rank, tp, _ep_rank=0):
    from megatron_p2t.checkpoint import llama_hf
    return llama_hf.hf_slices(module, hf_cfg, tp_rank, tp)


def _dense_layout(model_cfg, parallel) -> None:
    if parallel.expert != 1:
        raise ValueError(f"parallel.expert={parallel.expert} splits experts, and model.decoder={model_cfg.decoder} "
                         f"has none: set parallel.expert=1 or model.decoder=llama_moe")


LLAMA = register(DecoderSpec(name="llama", summary="LLaMA-3 (meta-llama/Llama-3.1-8B-Instruct and its sizes)",
                             tensors=_llama_tensors, slices=_llama_slices, check_parallel=_dense_layout))


def _moe_tensors(module, src, hf_cfg, moe, tp_rank, tp, prefix=""):
    from megatron_p2t.checkpoint import llama_moe_hf
    return llama_moe_hf.megatron_tensors(module, src, hf_cfg, moe, tp_rank, tp, prefix)


def _moe_slices(module, hf_cfg, _moe, tp_rank, tp, ep_rank=0):
    from megatron_p2t.checkpoint import llama_moe_hf
    return llama_moe_hf.hf_slices(module, hf_cfg, tp_rank, tp, ep_rank)


def _moe_hf_config(hf_cfg, moe):
    from megatron_p2t.checkpoint import llama_moe_hf
    return llama_moe_hf.hf_config(hf_cfg, moe)


def _check_moe_recompute(model_cfg) -> None:
    rc = model_cfg.recompute
    if rc.granularity == "full" and rc.method == "block":
        # megatron-core 0.16.1's block recompute runs the layers it does not recompute without the padding mask
        raise ValueError("model.recompute.method=block with model.decoder=llama_moe: megatron-core runs the layers "
                         "it keeps without the padding mask, so they would route padding to experts; use "
                         "model.recompute.method=uniform")


LLAMA_MOE = register(DecoderSpec(
    name="llama_moe",
    summary="LLaMA-3 with every MLP a mixture of experts (SEPIT; model.moe), upcycled from the dense model.llama or "
            "read from an exported MoE (Qwen2-MoE layout)",
    moe=lambda m: m.moe, tensors=_moe_tensors, slices=_moe_slices, hf_config=_moe_hf_config,
    recipe=lambda m: {"model.moe.experts": m.moe.experts}, check=_check_moe_recompute,
    check_parallel=lambda m, parallel: check_moe(m.moe, parallel.expert)))
