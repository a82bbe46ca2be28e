"""The mixture-of-experts decoder (model.decoder=llama_moe) between megatron-core names and Hugging Face's.

The HF layout is Qwen2-MoE's (`Qwen2MoeForCausalLM`, in transformers itself): LLaMA's attention, norms, embeddings
and rotary embedding (rope_parameters carries LLaMA-3.1's scaling), per layer `mlp.gate` (the router) and
`mlp.experts.<e>.{gate,up,down}_proj`, and Switch-style routing: softmax over all experts, then the top k
*without* renormalising (`norm_topk_prob=False`), which is what megatron-core computes for top-1 (it requires
the softmax before the top-k there). Mixtral would load as well but renormalises the chosen scores, so its top-1
output would be the expert's output times 1 instead of times its score. Qwen2-MoE's shared expert is written with
width 0 and a zero gate, so it adds nothing. Experts are written one tensor per expert, as the Qwen1.5-MoE
checkpoints on the Hub are; transformers fuses them on load.

A dense LLaMA (HF, or our stage-2 export with LoRA merged) is upcycled on load: every expert a copy of the
dense MLP with its down projection times experts / top_k (the top-k scores sum to top_k / experts at the
router's near-zero start), and router weights ~ N(0, model.moe.router_init_std^2) from a generator seeded by
(model.moe.seed, layer), the same at every layout. Attention and the rest come through llama_hf's table.
"""
from __future__ import annotations

import zlib
from typing import Dict, List

import torch

from megatron_p2t.checkpoint import llama_hf
from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.checkpoint.slicing import Entry, Slice, read, write

ROUTER = (Entry("mlp.router.weight", ("mlp.gate.weight",)),)
# one expert: megatron under mlp.experts.local_experts.<local>., HF under mlp.experts.<global>. (dense: mlp.)
EXPERT = (Entry("linear_fc1.weight", ("gate_proj.weight", "up_proj.weight"), 0, ("ffn", "ffn"), "gate_up"),
          Entry("linear_fc2.weight", ("down_proj.weight",), 1, ("ffn",)))
MOE_TYPE = "qwen2_moe"


def is_moe_dir(hf_cfg) -> bool:
    return getattr(hf_cfg, "model_type", "") == MOE_TYPE


def check_source(hf_cfg, moe, path: str) -> None:
    """An MoE source must have the configured experts and routing; a dense one is upcycled."""
    if not is_moe_dir(hf_cfg):
        return
    have = (hf_cfg.num_experts, hf_cfg.num_experts_per_tok, bool(hf_cfg.norm_topk_prob))
    if have != (moe.experts, moe.top_k, False) or getattr(hf_cfg, "shared_expert_intermediate_size", 0):
        raise CheckpointError(f"{path}: a mixture of {hf_cfg.num_experts} experts, top-{hf_cfg.num_experts_per_tok}"
                              f"{', renormalised' if hf_cfg.norm_topk_prob else ''}"
                              f"{', with a shared expert' if getattr(hf_cfg, 'shared_expert_intermediate_size', 0) else ''}"
                              f"; this run has model.moe.experts={moe.experts}, top_k={moe.top_k} (Switch scores, no "
                              f"shared expert): set them as the checkpoint has them")


def router_init(moe, layer: int, hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{moe.seed}:router:{layer}".encode()))
    return torch.randn(moe.experts, hidden, generator=g) * moe.router_init_std


def _layers(model):
    """(local index, global layer index, local expert count, first global expert) per decoder layer."""
    for i, layer in enumerate(model.decoder.layers):
        experts = layer.mlp.experts.local_experts
        first = layer.mlp.local_expert_indices[0]
        yield i, layer.layer_number - 1, len(experts), first


def megatron_tensors(model, ck, hf_cfg, moe, tp_rank: int, tp: int, prefix: str = "") -> Dict[str, torch.Tensor]:
    """This stage's and this rank's (TP slice, local experts) tensors, from an MoE directory or upcycled from a
    dense one."""
    spans, fusers = llama_hf.geometry(hf_cfg, tp_rank, tp)
    sd = llama_hf.megatron_tensors(model, ck, hf_cfg, tp_rank, tp, prefix, mlp=False)
    moe_src = is_moe_dir(hf_cfg)
    scale = moe.experts / moe.top_k
    for i, g, n_local, first in _layers(model):
        hf = f"{prefix}model.layers.{g}."
        meg = f"decoder.layers.{i}."
        if moe_src:
            sd.update(read(ROUTER, ck, hf, meg, spans))
        else:
            sd[meg + "mlp.router.weight"] = router_init(moe, g, hf_cfg.hidden_size)
            dense = read(EXPERT, ck, hf + "mlp.", "", spans, fusers)
            dense["linear_fc2.weight"] = dense["linear_fc2.weight"] * scale
        for j in range(n_local):
            tensors = read(EXPERT, ck, f"{hf}mlp.experts.{first + j}.", "", spans, fusers) if moe_src else dense
            sd.update({f"{meg}mlp.experts.local_experts.{j}.{k}": v for k, v in tensors.items()})
    return sd


def hf_slices(model, hf_cfg, tp_rank: int, tp: int, ep_rank: int) -> List[Slice]:
    """The inverse: this rank's tensors as slices of the Qwen2-MoE tensors. Expert-parallel ranks each give their
    own experts; what every expert-parallel rank holds alike comes from the first. The shared expert's empty
    tensors and zero gate come with the router."""
    spans, fusers = llama_hf.geometry(hf_cfg, tp_rank, tp)
    sd = model.state_dict()
    out = llama_hf.hf_slices(model, hf_cfg, tp_rank, tp, mlp=False) if ep_rank == 0 else []
    for i, g, n_local, first in _layers(model):
        hf = f"model.layers.{g}."
        meg = f"decoder.layers.{i}."
        for j in range(n_local):
            out += write(EXPERT, sd, f"{hf}mlp.experts.{first + j}.", f"{meg}mlp.experts.local_experts.{j}.", spans,
                         tp_rank, fusers)
        if ep_rank == 0 and tp_rank == 0:
            out += write(ROUTER, sd, hf, meg, spans, tp_rank)
            h, dt = hf_cfg.hidden_size, sd[meg + "mlp.router.weight"].dtype
            out += [Slice(f"{hf}mlp.shared_expert.gate_proj.weight", None, 0, 0, torch.zeros(0, h, dtype=dt)),
                    Slice(f"{hf}mlp.shared_expert.up_proj.weight", None, 0, 0, torch.zeros(0, h, dtype=dt)),
                    Slice(f"{hf}mlp.shared_expert.down_proj.weight", None, 0, 0, torch.zeros(h, 0, dtype=dt)),
                    Slice(f"{hf}mlp.shared_expert_gate.weight", None, 0, 0, torch.zeros(1, h, dtype=dt))]
    return out


def hf_config(llama_cfg, moe):
    """The Qwen2-MoE config of a model shaped like the LLaMA config `llama_cfg` (or an MoE config read back)."""
    from transformers import Qwen2MoeConfig
    if is_moe_dir(llama_cfg):
        return llama_cfg
    hd = getattr(llama_cfg, "head_dim", None) or llama_cfg.hidden_size // llama_cfg.num_attention_heads
    if hd * llama_cfg.num_attention_heads != llama_cfg.hidden_size:
        raise CheckpointError(f"head_dim {hd} x {llama_cfg.num_attention_heads} heads != hidden size "
                              f"{llama_cfg.hidden_size}: Qwen2-MoE derives head_dim from them, so this decoder has "
                              f"no Qwen2-MoE form")
    rope = dict(getattr(llama_cfg, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(llama_cfg, "rope_scaling", None) or {"rope_type": "default"})
        rope["rope_theta"] = getattr(llama_cfg, "rope_theta", 10000.0)
    cfg = Qwen2MoeConfig(
        vocab_size=llama_cfg.vocab_size, hidden_size=llama_cfg.hidden_size,
        intermediate_size=llama_cfg.intermediate_size, moe_intermediate_size=llama_cfg.intermediate_size,
        num_hidden_layers=llama_cfg.num_hidden_layers, num_attention_heads=llama_cfg.num_attention_heads,
        num_key_value_heads=llama_cfg.num_key_value_heads, max_position_embeddings=llama_cfg.max_position_embeddings,
        rms_norm_eps=llama_cfg.rms_norm_eps, rope_parameters=rope, tie_word_embeddings=False,
        num_experts=moe.experts, num_experts_per_tok=moe.top_k, norm_topk_prob=False,
        shared_expert_intermediate_size=0, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, output_router_logits=False, router_aux_loss_coef=moe.aux_loss,
        bos_token_id=llama_cfg.bos_token_id, eos_token_id=llama_cfg.eos_token_id,
        pad_token_id=getattr(llama_cfg, "pad_token_id", None))
    cfg.architectures = ["Qwen2MoeForCausalLM"]
    cfg.torch_dtype = getattr(llama_cfg, "torch_dtype", None) or getattr(llama_cfg, "dtype", None)
    return cfg
