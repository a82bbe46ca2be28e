"""LLaMA-3 / 3.1 as megatron-core's GPTModel: RMSNorm, SwiGLU, no biases, GQA, RoPE (base 500000, 3.1 scaling),
untied embeddings, vocab-parallel embedding / output layer / cross entropy. Configured from an HF LlamaConfig."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_p2t.models import llama_moe
from megatron_p2t.models.specs import decoder_layer_spec, norms_in, parallel_sizes
from megatron_p2t.parallel.layout import Layout, LayoutError

# megatron-core's RotaryEmbedding applies LLaMA-3.1's frequency scaling with these constants built in.
_MCORE_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}


def rope_settings(hf) -> dict:
    rs = getattr(hf, "rope_scaling", None) or {}
    params = getattr(hf, "rope_parameters", None) or {}
    base = getattr(hf, "rope_theta", None) or params.get("rope_theta", 10000.0)
    kind = rs.get("rope_type", rs.get("type")) or params.get("rope_type", "default")
    if kind == "default":
        return {"rotary_base": int(base), "rope_scaling": False}
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (LLaMA-3.1's 'llama3' scaling and none are)")
    src = rs or params
    for k, v in _MCORE_LLAMA31_SCALING.items():
        if float(src.get(k, v)) != v:
            raise ValueError(f"rope_scaling.{k}={src.get(k)}: megatron-core implements LLaMA-3.1's values only "
                             f"({_MCORE_LLAMA31_SCALING})")
    return {"rotary_base": int(base), "rope_scaling": True, "rope_scaling_factor": float(src.get("factor", 8.0))}


def recompute_settings(recompute, layers: int, pp: int = 1) -> dict:
    """megatron-core's settings for a RecomputeConfig (model.recompute) over `layers` decoder layers split into
    pp pipeline stages; a chunk size that does not fit the stages is refused by name."""
    if recompute is None or recompute.granularity == "none":
        return {}
    per_stage, n = layers // pp, recompute.num_layers
    if recompute.method == "uniform" and per_stage % n:
        raise LayoutError(f"model.recompute.num_layers={n} does not divide the {per_stage} decoder layers of each "
                          f"pipeline stage ({layers} over parallel.pipeline={pp}): uniform recompute runs chunks of "
                          f"that many layers; pick a divisor, or model.recompute.method=block")
    if recompute.method == "block" and n > per_stage:
        raise LayoutError(f"model.recompute.num_layers={n} is more than the {per_stage} decoder layers of each "
                          f"pipeline stage ({layers} over parallel.pipeline={pp}): block recompute takes the first "
                          f"num_layers of each stage; at most {per_stage}")
    return {"recompute_granularity": recompute.granularity, "recompute_method": recompute.method,
            "recompute_num_layers": n}


def transformer_config(hf, num_layers: int | None = None, params_dtype=torch.float32, layout: Layout | None = None,
                       moe=None, recompute=None, **overrides):
    """moe: a MoEConfig for model.decoder=llama_moe (each MLP a mixture of experts of the same width); recompute:
    a RecomputeConfig (model.recompute)."""
    kw = dict(
        num_layers=num_layers or hf.num_hidden_layers, hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads, num_query_groups=hf.num_key_value_heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size, normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        attention_dropout=0.0, hidden_dropout=0.0, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(), persist_layer_norm=False,
        bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, pipeline_dtype=params_dtype)
    kw.update(parallel_sizes(layout))
    kw.update(recompute_settings(recompute, kw["num_layers"], layout.pp if layout is not None else 1))
    if moe is not None:
        kw.update(llama_moe.config_overrides(moe, hf.intermediate_size),
                  expert_model_parallel_size=layout.ep if layout is not None else 1)
    kw.update(overrides)
    return TransformerConfig(**kw)


def build(hf, pre_process: bool = True, post_process: bool = True, config=None, layout: Layout | None = None,
          attention_kernel: str = "auto", **config_overrides):
    """A GPTModel stage (this rank's share of layers) shaped like the HF LlamaForCausalLM `hf` config;
    attention_kernel: packed rows' kernel (model.attention_kernel)."""
    if getattr(hf, "tie_word_embeddings", False):
        raise ValueError("tied input/output embeddings: LLaMA-3.1-8B unties them; this builder expects that")
    cfg = config or transformer_config(hf, layout=layout, **config_overrides)
    if cfg.num_moe_experts:
        spec = llama_moe.layer_spec(cfg.num_moe_experts, attention_kernel=attention_kernel)
    else:
        spec = decoder_layer_spec(attention_kernel=attention_kernel)
    model = GPTModel(cfg, spec, vocab_size=hf.vocab_size,
                     max_sequence_length=hf.max_position_embeddings, pre_process=pre_process,
                     post_process=post_process, parallel_output=True, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", **rope_settings(hf))
    return norms_in(model, cfg.params_dtype)
