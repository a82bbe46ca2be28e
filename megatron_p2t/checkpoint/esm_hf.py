"""ESM-2 weights between HF EsmModel / EsmForMaskedLM names and the megatron ESMEncoder.

Megatron's fused QKV for multi-head attention is laid out per head: [q_h; k_h; v_h] for each head h, weights
and biases alike; tensor-parallel ranks own whole heads. Attention output and fc2 are row-parallel (split
by input columns; their biases are whole on every rank), fc1 is column-parallel.
"""
from __future__ import annotations

from typing import Dict

import torch

from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
from megatron_p2t.checkpoint.llama_hf import _span, copy_into

PREFIXES = ("esm.", "", "esm_encoder.")  # EsmForMaskedLM, EsmModel, Prot2Text-V2's composite


def detect_prefix(ck: HFDir, candidates=PREFIXES) -> str:
    for p in candidates:
        if ck.has(f"{p}embeddings.word_embeddings.weight"):
            return p
    raise CheckpointError(f"{ck.path}: no ESM embedding tensor under any of the prefixes {candidates}; "
                          f"expected e.g. 'esm.embeddings.word_embeddings.weight'")


def _qkv(ck, p, hd, h0, h1, what):
    q = ck.get(p + "query." + what, 0, h0 * hd, h1 * hd)
    k = ck.get(p + "key." + what, 0, h0 * hd, h1 * hd)
    v = ck.get(p + "value." + what, 0, h0 * hd, h1 * hd)
    parts = []
    for h in range(h1 - h0):
        parts += [q[h * hd:(h + 1) * hd], k[h * hd:(h + 1) * hd], v[h * hd:(h + 1) * hd]]
    return torch.cat(parts, 0)


def layer_tensors(ck: HFDir, cfg, layer: int, tp_rank: int, tp: int, prefix: str) -> Dict[str, torch.Tensor]:
    p = f"{prefix}encoder.layer.{layer}."
    hd = cfg.hidden_size // cfg.num_attention_heads
    h0, h1 = _span(cfg.num_attention_heads, tp_rank, tp, "ESM attention heads")
    f0, f1 = _span(cfg.ffn_hidden_size, tp_rank, tp, "ESM intermediate_size")
    a = p + "attention."
    return {
        "input_layernorm.weight": ck.get(a + "LayerNorm.weight"),
        "input_layernorm.bias": ck.get(a + "LayerNorm.bias"),
        "self_attention.linear_qkv.weight": _qkv(ck, a + "self.", hd, h0, h1, "weight"),
        "self_attention.linear_qkv.bias": _qkv(ck, a + "self.", hd, h0, h1, "bias"),
        "self_attention.linear_proj.weight": ck.get(a + "output.dense.weight", 1, h0 * hd, h1 * hd),
        "self_attention.linear_proj.bias": ck.get(a + "output.dense.bias"),
        "pre_mlp_layernorm.weight": ck.get(p + "LayerNorm.weight"),
        "pre_mlp_layernorm.bias": ck.get(p + "LayerNorm.bias"),
        "mlp.linear_fc1.weight": ck.get(p + "intermediate.dense.weight", 0, f0, f1),
        "mlp.linear_fc1.bias": ck.get(p + "intermediate.dense.bias", 0, f0, f1),
        "mlp.linear_fc2.weight": ck.get(p + "output.dense.weight", 1, f0, f1),
        "mlp.linear_fc2.bias": ck.get(p + "output.dense.bias"),
    }


def megatron_tensors(enc, ck, tp_rank: int, tp: int, prefix: str | None = None) -> Dict[str, torch.Tensor]:
    prefix = detect_prefix(ck) if prefix is None else prefix
    sd = {"word_embeddings.weight": ck.get(f"{prefix}embeddings.word_embeddings.weight")}
    for i, layer in enumerate(enc.block.layers):
        for k, t in layer_tensors(ck, enc.cfg, layer.layer_number - 1, tp_rank, tp, prefix).items():
            sd[f"block.layers.{i}.{k}"] = t
    if enc.final_norm:
        sd["block.final_layernorm.weight"] = ck.get(f"{prefix}encoder.emb_layer_norm_after.weight")
        sd["block.final_layernorm.bias"] = ck.get(f"{prefix}encoder.emb_layer_norm_after.bias")
    return sd


def load_into(enc, ck: HFDir, tp_rank: int, tp: int, prefix: str | None = None) -> None:
    copy_into(enc, megatron_tensors(enc, ck, tp_rank, tp, prefix), ck.path)


def hf_slices(enc, tp_rank: int, tp: int, prefix: str = ""):
    """The inverse of megatron_tensors, as (hf name, dim, start, stop, tensor) slices of this rank."""
    sd = enc.state_dict()
    cfg = enc.cfg
    hd = cfg.hidden_size // cfg.num_attention_heads
    h0, h1 = _span(cfg.num_attention_heads, tp_rank, tp, "ESM attention heads")
    f0, f1 = _span(cfg.ffn_hidden_size, tp_rank, tp, "ESM intermediate_size")
    whole = tp_rank == 0
    out = [(f"{prefix}embeddings.word_embeddings.weight", None, 0, 0, sd["word_embeddings.weight"])] if whole else []
    for i, layer in enumerate(enc.block.layers):
        m, p = f"block.layers.{i}.", f"{prefix}encoder.layer.{layer.layer_number - 1}."
        a = p + "attention."
        for what in ("weight", "bias"):
            qkv = sd[m + "self_attention.linear_qkv." + what]
            heads = [qkv[h * 3 * hd:(h + 1) * 3 * hd] for h in range(h1 - h0)]
            for j, name in enumerate(("query", "key", "value")):
                out.append((f"{a}self.{name}.{what}", 0, h0 * hd, h1 * hd,
                            torch.cat([x[j * hd:(j + 1) * hd] for x in heads])))
        out += [(a + "output.dense.weight", 1, h0 * hd, h1 * hd, sd[m + "self_attention.linear_proj.weight"]),
                (p + "intermediate.dense.weight", 0, f0, f1, sd[m + "mlp.linear_fc1.weight"]),
                (p + "intermediate.dense.bias", 0, f0, f1, sd[m + "mlp.linear_fc1.bias"]),
                (p + "output.dense.weight", 1, f0, f1, sd[m + "mlp.linear_fc2.weight"])]
        if whole:
            out += [(a + "output.dense.bias", None, 0, 0, sd[m + "self_attention.linear_proj.bias"]),
                    (p + "output.dense.bias", None, 0, 0, sd[m + "mlp.linear_fc2.bias"]),
                    (a + "LayerNorm.weight", None, 0, 0, sd[m + "input_layernorm.weight"]),
                    (a + "LayerNorm.bias", None, 0, 0, sd[m + "input_layernorm.bias"]),
                    (p + "LayerNorm.weight", None, 0, 0, sd[m + "pre_mlp_layernorm.weight"]),
                    (p + "LayerNorm.bias", None, 0, 0, sd[m + "pre_mlp_layernorm.bias"])]
    if enc.final_norm and whole:
        out += [(f"{prefix}encoder.emb_layer_norm_after.weight", None, 0, 0, sd["block.final_layernorm.weight"]),
                (f"{prefix}encoder.emb_layer_norm_after.bias", None, 0, 0, sd["block.final_layernorm.bias"])]
    return out


def lora_tensors(enc, src, tp_rank: int, tp: int, prefix: str = "base_model.model.",
                 require_shared_a: bool = True) -> Dict[str, torch.Tensor]:
    """A PEFT adapter on HF EsmModel's query/key/value + attention.output.dense -> this rank's LoRA tensors of
    an ESMEncoder wrapped with targets linear_qkv + linear_proj. The fused QKV adapter shares one A, so the
    adapter's query/key/value A matrices must be equal (what our exports write); B rows follow the weight's
    per-head layout. (require_shared_a=False maps gradients, whose three A parts legitimately differ.)"""
    cfg = enc.cfg
    hd = cfg.hidden_size // cfg.num_attention_heads
    h0, h1 = _span(cfg.num_attention_heads, tp_rank, tp, "ESM attention heads")
    out = {}
    for i, layer in enumerate(enc.block.layers):
        a = f"{prefix}encoder.layer.{layer.layer_number - 1}.attention."
        m = f"block.layers.{i}.self_attention."
        qa = src.get(a + "self.query.lora_A.weight")
        for other in ("key", "value") if require_shared_a else ():
            if not torch.equal(src.get(f"{a}self.{other}.lora_A.weight"), qa):
                raise CheckpointError(f"{src.path}: {a}self.{other}.lora_A.weight differs from the query's; a fused "
                                      f"QKV adapter needs one shared A (merge the adapter into the weights instead)")
        out[m + "linear_qkv.lora_A"] = qa
        out[m + "linear_qkv.lora_B"] = _qkv(src, a + "self.", hd, h0, h1, "lora_B.weight")
        out[m + "linear_proj.lora_A"] = src.get(a + "output.dense.lora_A.weight", 1, h0 * hd, h1 * hd)
        out[m + "linear_proj.lora_B"] = src.get(a + "output.dense.lora_B.weight")
    return out
