"""LLaMA weights between HF LlamaForCausalLM names and megatron-core GPTModel (local spec) names.

Megatron fuses Q, K and V into one column-parallel weight laid out by query group: for each KV group g, its
query heads, then k_g, then v_g; tensor-parallel ranks own whole groups. fc1 stacks [gate; up], each half
split across ranks. Embedding and output layer are split by vocabulary rows, attention output and fc2 by
input columns. Import reads only this rank's slice; export writes the full HF tensors from all slices.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from torch import nn

from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
from megatron_p2t.checkpoint.slicing import Entry, Slice, copy_into, read, span, stack_rows, write
from megatron_p2t.models.lora import lora_layers
from megatron_p2t.models.parts_config import SAVABLE


# One decoder layer (megatron names under decoder.layers.<local>., HF names under model.layers.<global>.): what a
# mixture-of-experts layer shares with a dense one, then the dense MLP
ATTENTION = (
    Entry("input_layernorm.weight", ("input_layernorm.weight",)),
    Entry("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                               "self_attn.v_proj.weight"), 0, ("q", "kv", "kv"), "qkv"),
    Entry("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), 1, ("attention",)),
    Entry("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
)
MLP = (
    Entry("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0, ("ffn", "ffn"), "gate_up"),
    Entry("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), 1, ("ffn",)),
)
LAYER = ATTENTION + MLP
FIRST = (Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), 0, ("vocab",)),)
LAST = (Entry("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Entry("output_layer.weight", ("lm_head.weight",), 0, ("vocab",)))


def geometry(hf_cfg, tp_rank: int, tp: int):
    """(spans of this rank, fusers) for an HF LLaMA config."""
    hd = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    nq, nkv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    qpg = nq // nkv
    g0, g1 = span(nkv, tp_rank, tp, "num_key_value_heads")
    f0, f1 = span(hf_cfg.intermediate_size, tp_rank, tp, "intermediate_size")
    spans = {"q": (g0 * qpg * hd, g1 * qpg * hd), "kv": (g0 * hd, g1 * hd), "ffn": (f0, f1),
             "attention": span(nq * hd, tp_rank, tp, "attention width"),
             "vocab": span(hf_cfg.vocab_size, tp_rank, tp, "vocab_size")}
    fusers = {"qkv": (lambda p: fuse_qkv(*p, qpg, hd), lambda t: list(split_qkv(t, qpg, hd))),
              "gate_up": (stack_rows, lambda t: [t[: f1 - f0], t[f1 - f0:]])}
    return spans, fusers


def _tables(model, mlp: bool = True):
    """(table, megatron prefix, HF prefix) for each part this GPTModel stage holds; mlp=False leaves the MLPs
    out (a mixture of experts: llama_moe_hf's)."""
    out = [(FIRST, "", "")] if model.pre_process else []
    out += [(LAYER if mlp else ATTENTION, f"decoder.layers.{i}.", f"model.layers.{layer.layer_number - 1}.")
            for i, layer in enumerate(model.decoder.layers)]
    return out + ([(LAST, "", "")] if model.post_process else [])


def layer_tensors(ck: HFDir, hf_cfg, layer: int, tp_rank: int, tp: int, prefix: str = "") -> Dict[str, torch.Tensor]:
    """One decoder layer's megatron tensors (names relative to `decoder.layers.<local>.`) for this TP rank."""
    spans, fusers = geometry(hf_cfg, tp_rank, tp)
    return read(LAYER, ck, f"{prefix}model.layers.{layer}.", "", spans, fusers)


def megatron_tensors(model, ck, hf_cfg, tp_rank: int, tp: int, prefix: str = "",
                     mlp: bool = True) -> Dict[str, torch.Tensor]:
    """What this GPTModel stage's state dict must hold: this rank's TP slice of this stage's layers."""
    spans, fusers = geometry(hf_cfg, tp_rank, tp)
    sd = {}
    for table, meg, hf in _tables(model, mlp):
        sd.update(read(table, ck, prefix + hf, meg, spans, fusers))
    return sd


def load_into(model, ck: HFDir, hf_cfg, tp_rank: int, tp: int, prefix: str = "") -> None:
    copy_into(model, megatron_tensors(model, ck, hf_cfg, tp_rank, tp, prefix), ck.path)


def hf_slices(model, hf_cfg, tp_rank: int, tp: int, prefix: str = "", mlp: bool = True) -> List[Slice]:
    """The inverse of megatron_tensors: this stage's local tensors as slices of the HF tensors."""
    spans, fusers = geometry(hf_cfg, tp_rank, tp)
    sd = model.state_dict()
    out = []
    for table, meg, hf in _tables(model, mlp):
        out += write(table, sd, prefix + hf, meg, spans, tp_rank, fusers)
    return out


# --- LoRA adapters in PEFT's layout ----------------------------------------------------------------------------
# PEFT keeps one adapter per HF projection; megatron fuses q/k/v and gate/up, so the fused adapter shares one A
# (PEFT's q/k/v A's must be equal, and gate/up's) and stacks B's rows like the weight's. Column-parallel layers
# (qkv, fc1): A whole, B split by rows. Row-parallel (proj, fc2): A split by input columns, B whole.
PEFT_PREFIX = "base_model.model."
LORA_TARGETS = {"linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "linear_proj": ("self_attn.o_proj",),
                "linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
                "linear_fc2": ("mlp.down_proj",)}
# the weight each LoRA target adapts, from the LAYER table: how its B (column-parallel) or A (row-parallel) splits
_WEIGHT = {e.megatron.split(".")[1]: e for e in LAYER if e.dim is not None}
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}


def lora_tensors(model, src, hf_cfg, tp_rank: int, tp: int, targets, prefix: str = PEFT_PREFIX,
                 require_shared_a: bool = True) -> Dict[str, torch.Tensor]:
    """A PEFT adapter on LlamaForCausalLM -> this rank's lora_A / lora_B of a GPTModel stage wrapped with
    `targets`. require_shared_a=False maps gradients, whose per-projection A parts legitimately differ.
    B is split and fused like the weight it adapts (the LAYER table's spans and fusers)."""
    spans, fusers = geometry(hf_cfg, tp_rank, tp)
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        p = f"{prefix}model.layers.{layer.layer_number - 1}."
        for t in targets:
            m = f"decoder.layers.{i}.{_PARENT[t]}.{t}."
            names = [f"{p}{h}.lora_{{}}.weight" for h in LORA_TARGETS[t]]
            if t in ("linear_qkv", "linear_fc1"):
                a = src.get(names[0].format("A"))
                for other in names[1:] if require_shared_a else ():
                    if not torch.equal(src.get(other.format("A")), a):
                        raise CheckpointError(f"{src.path}: {other.format('A')} differs from {names[0].format('A')}; "
                                              f"a fused adapter needs one shared A (merge the adapter instead)")
                e = _WEIGHT[t]
                b = fusers[e.fuse][0]([src.get(n.format("B"), 0, *spans[k]) for n, k in zip(names, e.spans)])
            else:
                a, b = src.get(names[0].format("A"), 1, *spans[_WEIGHT[t].spans[0]]), src.get(names[0].format("B"))
            out[m + "lora_A"], out[m + "lora_B"] = a, b
    return out


def lora_hf_slices(model, hf_cfg, tp_rank: int, tp: int, prefix: str = PEFT_PREFIX):
    """The inverse of lora_tensors, as export slices of this rank."""
    spans, fusers = geometry(hf_cfg, tp_rank, tp)
    whole = tp_rank == 0
    out = []
    for name, mod in lora_layers(model).items():
        i, t = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        p = f"{prefix}model.layers.{model.decoder.layers[i].layer_number - 1}."
        a, b = mod.lora_A.detach(), mod.lora_B.detach()
        hf, e = LORA_TARGETS[t], _WEIGHT[t]
        if e.fuse:
            out += [Slice(f"{p}{h}.lora_B.weight", 0, *spans[k], x)
                    for h, k, x in zip(hf, e.spans, fusers[e.fuse][1](b))]
        else:
            out.append(Slice(f"{p}{hf[0]}.lora_A.weight", 1, *spans[e.spans[0]], a))
            if whole:
                out.append(Slice(f"{p}{hf[0]}.lora_B.weight", None, 0, 0, b))
        if whole and e.fuse:
            out += [Slice(f"{p}{h}.lora_A.weight", None, 0, 0, a.clone()) for h in hf]  # one tensor per file entry
    return out


def saved_module_slices(model, hf_cfg, modules, tp_rank: int, tp: int, prefix: str = PEFT_PREFIX) -> List[Slice]:
    """The decoder modules trained fully beside the adapters (LoRAConfig.modules_to_save: embedding, output_layer)
    as PEFT stores its modules_to_save: whole tensors under their HF names (`base_model.model.model.embed_tokens.
    weight`, `base_model.model.lm_head.weight`); this stage's, from this rank's vocabulary rows."""
    spans, fusers = geometry(hf_cfg, tp_rank, tp)
    held = (FIRST if model.pre_process else ()) + (LAST if model.post_process else ())
    table = [e for e in held if e.megatron.split(".")[0] in modules]
    return write(table, model.state_dict(), prefix, "", spans, tp_rank, fusers)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpg: int, hd: int) -> torch.Tensor:
    """Rows of q/k/v (this rank's groups) -> megatron's per-group [q heads; k; v] layout."""
    parts = []
    for g in range(k.shape[0] // hd):
        parts += [q[g * qpg * hd:(g + 1) * qpg * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    return torch.cat(parts, 0)


def split_qkv(qkv: torch.Tensor, qpg: int, hd: int):
    per = (qpg + 2) * hd
    groups = [qkv[g * per:(g + 1) * per] for g in range(qkv.shape[0] // per)]
    return (torch.cat([x[:qpg * hd] for x in groups]), torch.cat([x[qpg * hd:(qpg + 1) * hd] for x in groups]),
            torch.cat([x[(qpg + 1) * hd:] for x in groups]))


@torch.no_grad()
def load_lora(model: nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors (named `<layer>.lora_A` / `.lora_B`) into a wrapped model; every adapter of the model
    must be covered and every shape must agree."""
    own = {f"{n}.{w}": getattr(m, w) for n, m in lora_layers(model).items() for w in ("lora_A", "lora_B")}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise CheckpointError(f"{source}: adapter does not fit the model: missing {missing[:4]}, unexpected "
                              f"{extra[:4]} (same LoRA targets and layers?)")
    for k, t in tensors.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (same rank r?)")
        own[k].copy_(t)


def finish_peft_adapter(adapter_dir: str, lora_cfg, base_model: str) -> None:
    """Give exported adapter tensors (`lora_hf_slices`, and `saved_module_slices` for modules_to_save, written to
    adapter_dir/model.safetensors) PEFT's file name and its adapter_config.json, so
    `PeftModel.from_pretrained(llama, adapter_dir)` loads them."""
    os.replace(os.path.join(adapter_dir, "model.safetensors"), os.path.join(adapter_dir, "adapter_model.safetensors"))
    targets = sorted({h.split(".")[-1] for t in lora_cfg.targets for h in LORA_TARGETS[t]})
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                   "r": lora_cfg.r, "lora_alpha": lora_cfg.alpha or 2 * lora_cfg.r, "lora_dropout": lora_cfg.dropout,
                   "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
                   "modules_to_save": [SAVABLE[m] for m in lora_cfg.modules_to_save] or None,
                   "inference_mode": True}, f, indent=1)
