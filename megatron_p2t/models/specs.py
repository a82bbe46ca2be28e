"""Layer specs and config plumbing shared by the model parts."""
from __future__ import annotations

import copy

import torch


def parallel_sizes() -> dict:
    """TP/PP sizes for a TransformerConfig, from megatron-core's groups when they exist."""
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        return {}
    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}


def cpu_friendly() -> dict:
    """Fusions that need CUDA/apex kernels stay off; on GPU the same keys can be switched on from the config."""
    return dict(use_cpu_initialization=not torch.cuda.is_available(), persist_layer_norm=False,
                bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                gradient_accumulation_fusion=False, bias_dropout_fusion=False)


def encoder_layer_spec(normalization: str = "LayerNorm"):
    """megatron-core's local transformer layer with bidirectional attention over a padding mask."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
    return spec


def decoder_layer_spec(normalization: str = "RMSNorm"):
    """megatron-core's local GPT layer with SegmentAttention as core attention: causal, or causal within each
    packed sample when the attention mask carries segment ids (transformer/attention.py)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_p2t.transformer.attention import SegmentAttention
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = SegmentAttention
    return spec


def megatron_module():
    """megatron-core's MegatronModule, imported when a model class is defined (keeps configs import-light)."""
    from megatron.core.transformer.module import MegatronModule
    return MegatronModule
