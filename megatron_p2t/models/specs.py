"""Layer specs and config plumbing shared by the model parts."""
from __future__ import annotations

import copy
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType

from megatron_p2t.parallel.layout import Layout
from megatron_p2t.transformer.attention import SegmentAttention
from megatron_p2t.transformer.padded_attention import PaddedAttention


def parallel_sizes(layout: Layout | None) -> dict:
    """TP/PP sizes for a TransformerConfig (none: a world of one)."""
    return layout.transformer_sizes() if layout is not None else {}


def cpu_friendly() -> dict:
    """Fusions that need CUDA/apex kernels stay off; on GPU the same keys can be switched on from the config."""
    return dict(use_cpu_initialization=not torch.cuda.is_available(), persist_layer_norm=False,
                bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                gradient_accumulation_fusion=False, bias_dropout_fusion=False)


def norms_in(module, dtype: torch.dtype):
    """Without apex, megatron-core's local spec builds torch LayerNorm / RMSNorm weights in float32 whatever
    params_dtype says. A bf16 model keeps every weight in bf16, as the HF checkpoints it is read from and written
    back to do (Megatron-LM casts its whole model the same way): an export then gives each tensor back in its
    own dtype, and the norms run torch's fused kernel instead of a mixed-dtype fallback."""
    for m in module.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            m.to(dtype)
    return module


def encoder_layer_spec(normalization: str = "LayerNorm", attention_kernel: str = "auto"):
    """megatron-core's local transformer layer with bidirectional attention as core attention
    (transformer/padded_attention.py): SDPA over a padding mask (and an optional additive bias), or within each
    protein of an unpadded row by `attention_kernel` (model.attention_kernel)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
    spec.submodules.self_attention.submodules.core_attention = functools.partial(PaddedAttention,
                                                                                 kernel=attention_kernel)
    return spec


def segment_attention(kernel: str = "auto"):
    """SegmentAttention as core attention: causal, or causal within each packed sample when the attention mask
    carries segment ids, by `kernel` (model.attention_kernel; transformer/attention.py). megatron-core calls the
    core-attention slot with its own keywords, so the kernel travels bound in."""
    return functools.partial(SegmentAttention, kernel=kernel)


def decoder_layer_spec(normalization: str = "RMSNorm", attention_kernel: str = "auto"):
    """megatron-core's local GPT layer with SegmentAttention as core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = segment_attention(attention_kernel)
    return spec

