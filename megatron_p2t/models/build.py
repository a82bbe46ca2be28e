"""The joined model for this rank's pipeline stage, from its parts' shapes (HF configs) and the layout.
Reading those shapes and the weights from checkpoint directories is checkpoint/load.py's."""
from __future__ import annotations

import torch

from megatron_p2t.models import llama as llama_mod
from megatron_p2t.models.esm import ESMConfig
from megatron_p2t.models.p2t import Prot2TextModel
from megatron_p2t.parallel.layout import Layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_of(cfg) -> torch.dtype:
    return DTYPES[cfg.model.dtype]


def moe_of(model_cfg):
    """The MoE settings when the decoder is a mixture of experts, else None."""
    return model_cfg.moe if model_cfg.decoder == "llama_moe" else None


def fusions(on: bool) -> dict:
    """megatron-core's torch.compile'd kernels a decoder without TE or apex can use (model.fused_kernels); RoPE's
    fusion needs Transformer Engine, the gradient-accumulation one apex's CUDA extension, and the masked-softmax
    one is not on our attention's path."""
    return {"bias_activation_fusion": on, "bias_dropout_fusion": on}


def build(model_cfg, layout: Layout, llama_cfg, esm_cfg, pcfg, placeholder_id: int) -> Prot2TextModel:
    """Prot2TextModel for this rank: the encoder and connector (if the recipe has them) on the first stage, this
    stage's decoder layers. esm_cfg is None for a decoder-only recipe."""
    model = Prot2TextModel(ESMConfig.from_hf(esm_cfg) if esm_cfg is not None else None, llama_cfg, pcfg,
                           placeholder_id,
                           pre_process=layout.first_stage, post_process=layout.last_stage,
                           esm_output_layer=model_cfg.esm_output_layer, freeze=model_cfg.freeze,
                           llm_config=llama_mod.transformer_config(llama_cfg, params_dtype=DTYPES[model_cfg.dtype],
                                                                   layout=layout, moe=moe_of(model_cfg),
                                                                   recompute=model_cfg.recompute,
                                                                   **fusions(model_cfg.fused_kernels)),
                           layout=layout, connector=model_cfg.connector, resampler=model_cfg.resampler,
                           encoder=model_cfg.encoder, structure=model_cfg.structure,
                           attention_kernel=model_cfg.attention_kernel,
                           recompute_encoder=model_cfg.recompute.encoder)
    if torch.cuda.is_available():  # plain torch parts (the ESM embedding) are built on the CPU, as in Megatron-LM
        model.cuda(torch.cuda.current_device())
    return model
