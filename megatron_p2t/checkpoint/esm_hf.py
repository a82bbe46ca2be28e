"""ESM-2 weights between HF EsmModel / EsmForMaskedLM names and the megatron ESMEncoder.

Megatron's fused QKV for multi-head attention is laid out per head: [q_h; k_h; v_h] for each head h, weights
and biases alike; tensor-parallel ranks own whole heads. Attention output and fc2 are row-parallel (split
by input columns; their biases are whole on every rank), fc1 is column-parallel.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
from megatron_p2t.checkpoint.slicing import Entry, Slice, copy_into, read, span, write

PREFIXES = ("esm.", "", "esm_encoder.")  # EsmForMaskedLM, EsmModel, Prot2Text-V2's composite


def detect_prefix(ck: HFDir, candidates=PREFIXES) -> str:
    for p in candidates:
        if ck.has(f"{p}embeddings.word_embeddings.weight"):
            return p
    raise CheckpointError(f"{ck.path}: no ESM embedding tensor under any of the prefixes {candidates}; "
                          f"expected e.g. 'esm.embeddings.word_embeddings.weight'")


def _qkv(ck, p, hd, h0, h1, what):
    """q/k/v of heads h0:h1 from HF's separate projections, in megatron's per-head [q_h; k_h; v_h] layout."""
    return _fuse_heads([ck.get(p + f"{n}." + what, 0, h0 * hd, h1 * hd) for n in ("query", "key", "value")], hd)


def _fuse_heads(qkv, hd):
    q, k, v = qkv
    parts = []
    for h in range(q.shape[0] // hd):
        parts += [q[h * hd:(h + 1) * hd], k[h * hd:(h + 1) * hd], v[h * hd:(h + 1) * hd]]
    return torch.cat(parts, 0)


def _split_heads(t, hd):
    heads = [t[h * 3 * hd:(h + 1) * 3 * hd] for h in range(t.shape[0] // (3 * hd))]
    return [torch.cat([x[j * hd:(j + 1) * hd] for x in heads]) for j in range(3)]


_QKV = tuple(f"attention.self.{n}." for n in ("query", "key", "value"))
# One encoder layer (megatron names under block.layers.<local>., HF names under encoder.layer.<global>.);
# split entries first, in the order export writes them
LAYER = (
    Entry("self_attention.linear_qkv.weight", tuple(q + "weight" for q in _QKV), 0, ("heads",) * 3, "qkv"),
    Entry("self_attention.linear_qkv.bias", tuple(q + "bias" for q in _QKV), 0, ("heads",) * 3, "qkv"),
    Entry("self_attention.linear_proj.weight", ("attention.output.dense.weight",), 1, ("heads",)),
    Entry("mlp.linear_fc1.weight", ("intermediate.dense.weight",), 0, ("ffn",)),
    Entry("mlp.linear_fc1.bias", ("intermediate.dense.bias",), 0, ("ffn",)),
    Entry("mlp.linear_fc2.weight", ("output.dense.weight",), 1, ("ffn",)),
    Entry("self_attention.linear_proj.bias", ("attention.output.dense.bias",)),
    Entry("mlp.linear_fc2.bias", ("output.dense.bias",)),
    Entry("input_layernorm.weight", ("attention.LayerNorm.weight",)),
    Entry("input_layernorm.bias", ("attention.LayerNorm.bias",)),
    Entry("pre_mlp_layernorm.weight", ("LayerNorm.weight",)),
    Entry("pre_mlp_layernorm.bias", ("LayerNorm.bias",)),
)
FIRST = (Entry("word_embeddings.weight", ("embeddings.word_embeddings.weight",)),)
FINAL_NORM = (Entry("block.final_layernorm.weight", ("encoder.emb_layer_norm_after.weight",)),
              Entry("block.final_layernorm.bias", ("encoder.emb_layer_norm_after.bias",)))


def geometry(cfg, tp_rank: int, tp: int):
    hd = cfg.hidden_size // cfg.num_attention_heads
    h0, h1 = span(cfg.num_attention_heads, tp_rank, tp, "ESM attention heads")
    spans = {"heads": (h0 * hd, h1 * hd), "ffn": span(cfg.ffn_hidden_size, tp_rank, tp, "ESM intermediate_size")}
    return spans, {"qkv": (lambda p: _fuse_heads(p, hd), lambda t: _split_heads(t, hd))}


def _tables(enc):
    out = [(FIRST, "", "")]
    out += [(LAYER, f"block.layers.{i}.", f"encoder.layer.{layer.layer_number - 1}.")
            for i, layer in enumerate(enc.block.layers)]
    return out + ([(FINAL_NORM, "", "")] if enc.final_norm else [])


def layer_tensors(ck: HFDir, cfg, layer: int, tp_rank: int, tp: int, prefix: str) -> Dict[str, torch.Tensor]:
    spans, fusers = geometry(cfg, tp_rank, tp)
    return read(LAYER, ck, f"{prefix}encoder.layer.{layer}.", "", spans, fusers)


def megatron_tensors(enc, ck, tp_rank: int, tp: int, prefix: str | None = None) -> Dict[str, torch.Tensor]:
    prefix = detect_prefix(ck) if prefix is None else prefix
    spans, fusers = geometry(enc.cfg, tp_rank, tp)
    sd = {}
    for table, meg, hf in _tables(enc):
        sd.update(read(table, ck, prefix + hf, meg, spans, fusers))
    return sd


def load_into(enc, ck: HFDir, tp_rank: int, tp: int, prefix: str | None = None, keep=()) -> None:
    copy_into(enc, megatron_tensors(enc, ck, tp_rank, tp, prefix), ck.path, keep)


def hf_slices(enc, tp_rank: int, tp: int, prefix: str = "") -> List[Slice]:
    """The inverse of megatron_tensors: this rank's tensors as slices of the HF tensors."""
    spans, fusers = geometry(enc.cfg, tp_rank, tp)
    sd = enc.state_dict()
    out = []
    for table, meg, hf in _tables(enc):
        out += write(table, sd, prefix + hf, meg, spans, tp_rank, fusers)
    return out


def lora_tensors(enc, src, tp_rank: int, tp: int, prefix: str = "base_model.model.",
                 require_shared_a: bool = True) -> Dict[str, torch.Tensor]:
    """A PEFT adapter on HF EsmModel's query/key/value + attention.output.dense -> this rank's LoRA tensors of
    an ESMEncoder wrapped with targets linear_qkv + linear_proj. The fused QKV adapter shares one A, so the
    adapter's query/key/value A matrices must be equal (what our exports write); B rows follow the weight's
    per-head layout. (require_shared_a=False maps gradients, whose three A parts legitimately differ.)"""
    cfg = enc.cfg
    hd = cfg.hidden_size // cfg.num_attention_heads
    h0, h1 = span(cfg.num_attention_heads, tp_rank, tp, "ESM attention heads")
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


def rotary_inv_freq(esm_cfg) -> torch.Tensor:
    """ESM's rotary inverse frequencies, as EsmModel computes its buffer from the head size."""
    hd = esm_cfg.hidden_size // esm_cfg.num_attention_heads
    return 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))


def model_extras(src: str | None, esm_cfg, num_layers: int) -> List[Slice]:
    """What transformers' EsmModel holds beside the weights the encoder uses, so an export's esm/ loads with
    nothing missing: the rotary inverse frequencies (a buffer EsmModel derives from the head size, under the names
    this transformers version gives it) and, when the export keeps every layer, the contact head of the ESM
    checkpoint the run started from (`src`; it reads all layers' attention maps, so a truncated encoder has
    none)."""
    from transformers import EsmModel
    cfg = esm_cfg.__class__.from_dict({**esm_cfg.to_dict(), "num_hidden_layers": num_layers})
    with torch.device("meta"):
        names = list(EsmModel(cfg, add_pooling_layer=False).state_dict())
    out = [Slice(n, None, 0, 0, rotary_inv_freq(esm_cfg)) for n in names if n.endswith("inv_freq")]
    if src and num_layers == esm_cfg.num_hidden_layers and any(n.startswith("contact_head.") for n in names):
        ck = HFDir(src)
        p = detect_prefix(ck)
        out += [Slice(n, None, 0, 0, ck.get(p + n)) for n in names if n.startswith("contact_head.") and ck.has(p + n)]
    return out
