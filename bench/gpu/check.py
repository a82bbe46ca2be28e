"""The device check: what a lent GPU measures in one short run (`bench/gpu/run.sh`); `--tiny` runs the same
code paths at toy shapes on the CPU (a test does, so the script works when a GPU comes).

1. precision: the joined model (ours, megatron-core) in bf16 against fp32 on the same random weights: loss,
   logits and the trainable parameters' gradients, as relative errors;
2. attention (run first): every packed-row kernel that runs here (model.attention_kernel: flash-attn's varlen when
   installed, PyTorch's varlen, SDPA per sample) against the packed path computed in fp32 on the CPU, forward
   and gradients, and its time beside one SDPA with a dense block mask; a kernel that fails here is kept out of
   the model sections (they take SDPA per sample);
3. stage 2: one training step at the real shapes (ESM-2-3B frozen, LLaMA-3.1-8B architecture with LoRA r 16
   on every linear, projector trained, packed 4096-token rows) beside the plain Hugging Face + PEFT step the
   official code takes (padded batch, SDPA attention) on the same samples: real tokens/s, model TFLOP/s, MFU;
4. stage 1: the H-SCALE step on ESM-2-3B + projector with cached text vectors, and with the text side (LLaMA's
   first 16 layers) computed, on the same proteins; and with cached vectors again, ESM on the padded batch instead
   of its real tokens only (models/esm.py's unpad);
5. structure: the structure-aware encoder (C-alpha distance bias, 128 kernels) in bf16 against fp32 on the same
   weights, and its forward+backward at ESM-2-3B's shape on 1,021-residue proteins with vs without coordinates
   (the bias's cost and peak memory, same run), and without coordinates through megatron-core's unfused
   attention instead of SDPA (transformer/padded_attention.py: what that change bought);
6. moe: the mixture-of-experts decoder (4 experts, top-1) in bf16 against fp32, and two layers at LLaMA-3.1-8B's
   width dense vs MoE on one packed row (megatron-core's alltoall dispatcher, SequentialMLP experts: grouped GEMM
   needs Transformer Engine or the grouped_gemm package);
7. fusion: model.fused_kernels (megatron-core's torch.compile'd SwiGLU and bias-dropout-add) against the plain
   decoder, two layers at LLaMA-3.1-8B's width on one packed row: step time, the first (compiling) step, peak
   memory, and the output's and gradients' relative difference. --tiny runs the fused functions uncompiled (the
   CPU's C++ compile of them takes ~30 s on 2 cores).
Weights are random (nothing can be downloaded there); the shapes are the real ones. Every figure goes to
check.json and check.md in --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peak from the vendors' data sheets (SXM parts), for MFU.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "A100": 312e12,
             "B200": 2250e12}

ESM2_3B = dict(vocab_size=33, hidden_size=2560, num_hidden_layers=36, num_attention_heads=40,
               intermediate_size=10240)
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)


@dataclasses.dataclass
class Shapes:
    esm: dict
    llama: dict
    check_esm: dict           # the precision check's smaller model (fp32 copies of 11B would dominate the run)
    check_llama: dict
    pack_length: int
    samples: int              # stage-2 samples per step (as many as fill about two packed rows)
    align_batch: int
    steps: int
    warmup: int
    protein_median: int
    answer_median: int
    attn_heads: int
    attn_groups: int
    attn_dim: int
    text_layer: int = 16      # stage 1's text side: LLaMA's layer 16 of 32, as Prot2Text-V2


REAL = Shapes(esm=ESM2_3B, llama=LLAMA31_8B,
              check_esm=dict(vocab_size=33, hidden_size=480, num_hidden_layers=6, num_attention_heads=20,
                             intermediate_size=1920),
              check_llama=dict(vocab_size=128256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                               num_attention_heads=16, num_key_value_heads=4),
              pack_length=4096, samples=12, align_batch=32, steps=5, warmup=2, protein_median=350,
              answer_median=80, attn_heads=32, attn_groups=8, attn_dim=128)
TINY = Shapes(esm=dict(vocab_size=33, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96),
              llama=dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2),
              check_esm=dict(vocab_size=33, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96),
              check_llama=dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2),
              pack_length=256, samples=6, align_batch=8, steps=2, warmup=1, protein_median=40, answer_median=12,
              attn_heads=4, attn_groups=2, attn_dim=16, text_layer=1)
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------- configs, data

def hf_dirs(work: str, sh_esm: dict, sh_llama: dict, tag: str) -> tuple[str, str]:
    """config.json-only HF directories of these shapes: the model builder reads shapes from them, and the weights
    stay random."""
    from transformers import EsmConfig, LlamaConfig

    from megatron_p2t.models.tiny import LLAMA31_ROPE
    esm = EsmConfig(**sh_esm, position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                    pad_token_id=1, mask_token_id=32, max_position_embeddings=1026, layer_norm_eps=1e-5)
    llama = LlamaConfig(**sh_llama, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=dict(LLAMA31_ROPE), tie_word_embeddings=False, rms_norm_eps=1e-5,
                        bos_token_id=128000, eos_token_id=128009)
    d = {k: os.path.join(work, tag, k) for k in ("esm", "llama")}
    esm.save_pretrained(d["esm"])
    llama.save_pretrained(d["llama"])
    return d["esm"], d["llama"]


def tiny_tokenizer(work: str):
    """A LLaMA-3.1-layout tokenizer for --tiny (the real run has none: its vocabulary is LLaMA-3.1's, 128,256
    ids, placeholder 128003)."""
    from megatron_p2t.data.text_tokenizer import build_llama3_style_tokenizer
    texts = ["Catalyzes the hydrolysis of ATP coupled with the transport of ions across the membrane."] * 8
    return build_llama3_style_tokenizer(texts, os.path.join(work, "tokenizer"), vocab_size=300)


def run_config(shapes: Shapes, esm_dir: str, llama_dir: str, tokenizer: str | None, dtype: str,
               attention_kernel: str = "auto"):
    from megatron_p2t.config import load_config
    return load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"),
                       [f"model.encoder_path={esm_dir}", f"model.llama={llama_dir}",
                        f"data.text_tokenizer={tokenizer or ''}",
                        f"model.dtype={dtype}", f"instruct.pack_length={shapes.pack_length}",
                        f"align.text_layer={shapes.text_layer}", f"model.attention_kernel={attention_kernel}"])


def attention_kernel(res: dict) -> str:
    """model.attention_kernel for the model sections: auto, unless the attention section saw auto's kernel fail
    here; then SDPA per sample, so one kernel's failure does not cost the step figures too."""
    att = res.get("attention") or {}
    return "sdpa" if att.get("auto_kernel") in att.get("failed_kernels", []) else "auto"


def kernel_taken(kernel: str, dtype: str) -> str:
    """The kernel a model.attention_kernel setting runs packed rows with on this device in this dtype."""
    from megatron_p2t.transformer.attention import kernel_for
    probe = torch.empty(1, 1, 1, device=device(), dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return kernel_for(kernel, probe, 0.0)[0]


def samples(shapes: Shapes, vocab: int, placeholder: int, n: int, seed: int = 0):
    """n stage-2 samples shaped like SwissProt's: protein length and answer length drawn around the medians
    (log-normal, as real lengths are), prompt ~60 tokens plus one placeholder per ESM token."""
    from megatron_p2t.data import esm_alphabet
    from megatron_p2t.data.instruct import Encoded
    rng = np.random.default_rng(seed)
    hi = min(vocab, placeholder, 128000)  # other tokens never equal the placeholder (nor LLaMA-3's specials)
    enc, prots = [], []
    for _ in range(n):
        lp = int(np.clip(rng.lognormal(math.log(shapes.protein_median), 0.5), 8, 1021))
        la = int(np.clip(rng.lognormal(math.log(shapes.answer_median), 0.6), 4, 400))
        prompt = np.concatenate([rng.integers(0, hi, 40), np.full(lp + 2, placeholder), rng.integers(0, hi, 20)])
        answer = rng.integers(0, hi, la)
        ids = np.concatenate([prompt, answer]).astype(np.int64)
        targets = np.full(len(ids), -100, dtype=np.int64)
        targets[len(prompt) - 1:-1] = answer
        enc.append(Encoded(ids=ids, targets=targets, n_protein=lp + 2))
        prots.append(esm_alphabet.encode("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), lp))))
    width = max(len(p) for p in prots)
    pids = torch.full((n, width), esm_alphabet.PAD, dtype=torch.long)
    for i, p in enumerate(prots):
        pids[i, :len(p)] = torch.from_numpy(p)
    return enc, pids, pids != esm_alphabet.PAD


def hf_padded(batch: dict) -> dict:
    """A padded (one sample per row) stage-2 batch as Hugging Face's causal LM takes it: attention mask from the
    lengths, labels at the position of the token they are (HF shifts them)."""
    n, w = batch["input_ids"].shape
    mask = (torch.arange(w)[None, :] < batch["lengths"][:, None]).long()
    labels = torch.full((n, w), -100, dtype=torch.long)
    labels[:, 1:] = torch.where(batch["loss_mask"].bool(), batch["labels"], -100)[:, :-1]
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels,
            "protein_ids": batch["protein_ids"], "protein_mask": batch["protein_mask"]}


# ---------------------------------------------------------------------------------------------- model FLOPs

def stage2_flops(llama_cfg, esm_cfg, text_lengths, protein_lengths, lora_params: int, projector_params: int,
                 text_layers: int | None = None, backward: bool = True) -> float:
    """The FLOPs a step needs, padding excluded (the same count for both implementations), from the planner's one
    FLOP model (megatron_p2t.plan): the frozen decoder (forward, and input gradients in backward), LoRA trained
    fully, ESM forward only, the projector trained in both stages. text_layers (stage 1's text side): that many
    decoder layers, forward only, no output layer."""
    from megatron_p2t.plan import Arch, decoder_flops, encoder_flops, trained_flops
    llama, esm = Arch.from_hf(llama_cfg), Arch.from_hf(esm_cfg)
    f = decoder_flops(llama, text_lengths, layers=text_layers, output_layer=text_layers is None, backward=backward)
    f += trained_flops(lora_params, sum(text_lengths)) if backward else 0.0
    f += encoder_flops(esm, protein_lengths)
    return f + trained_flops(projector_params, sum(protein_lengths))


# ---------------------------------------------------------------------------------------------- our model

def build_ours(cfg, lora: bool = True):
    """The joined model as stage 2 builds it (parts.assemble.build_model + LoRA on the decoder), random
    weights."""
    from megatron_p2t.parts.assemble import build_model
    from megatron_p2t.models.lora import apply_lora
    from megatron_p2t.parallel.state import current
    from megatron_p2t.training.joined import stage2_config
    cfg = stage2_config(cfg)
    torch.manual_seed(0)
    model, llama_cfg, esm_cfg, pcfg = build_model(cfg.model, cfg.data, current())
    if lora:
        apply_lora(model.llm, cfg.model.llm_lora, "llm")
        with torch.no_grad():  # B starts at zero; random B makes the adapters' path count in the comparison
            g = torch.Generator().manual_seed(1)
            for n, p in model.named_parameters():
                if ".lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(device()), llama_cfg, esm_cfg, pcfg


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def timed_steps(step, shapes: Shapes) -> list[float]:
    times = []
    for i in range(shapes.warmup + shapes.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= shapes.warmup:
            times.append(time.perf_counter() - t0)
    return times


def host_syncs(step) -> int | None:
    """How often one step stops the host until the GPU has caught up (torch's sync debug mode warns at each .item(),
    nonzero, host copy ...): the kernels queued ahead drain at every one. None off CUDA, where nothing is queued."""
    if not torch.cuda.is_available():
        return None
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------- 1. precision

def check_precision(shapes: Shapes, work: str, tokenizer: str | None, kernel: str = "auto") -> dict:
    from megatron_p2t.data.instruct import collate_instruct
    from megatron_p2t.parts.assemble import placeholder_id
    from megatron_p2t.training import joined
    from megatron_p2t.training.batches import to_device
    esm_dir, llama_dir = hf_dirs(work, shapes.check_esm, shapes.check_llama, "check")
    out, ref = {}, None
    for dtype in ("float32", "bfloat16"):
        cfg = run_config(shapes, esm_dir, llama_dir, tokenizer, dtype, kernel)
        cfg.model.llm_lora.dropout, cfg.model.projector.dropout = 0.0, 0.0  # the same function in both dtypes
        model, llama_cfg, *_ = build_ours(cfg)
        if ref is not None:
            model.load_state_dict(ref["state"])  # the fp32 model's weights, rounded to bf16
        pid = placeholder_id(cfg.model, cfg.data.text_tokenizer)
        enc, pids, pmask = samples(shapes, llama_cfg.vocab_size, pid, shapes.samples, seed=1)
        batch = collate_instruct(enc, pids, pmask, 0, pack=True, pack_length=shapes.pack_length)
        loss, _ = joined.forward_loss(model, batch)
        loss.backward()
        with torch.no_grad():
            b = to_device(batch)
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           attention_mask=b["attention_mask"], protein_ids=b["protein_ids"],
                           protein_mask=b["protein_mask"])
            sel = logits[b["loss_mask"].bool()].float().cpu()   # the answer positions' logits
        grads = torch.cat([p.grad.float().flatten().cpu() for p in trainable(model)])
        if ref is None:
            state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
            ref = {"state": state, "loss": float(loss), "logits": sel, "grads": grads}
        else:
            out = {"loss_fp32": ref["loss"], "loss_bf16": float(loss),
                   "loss_rel_error": abs(float(loss) - ref["loss"]) / abs(ref["loss"]),
                   "logits_rel_error": rel(sel, ref["logits"]), "grads_rel_error": rel(grads, ref["grads"]),
                   "trainable_params": int(grads.numel()), "answer_tokens": int(batch["loss_mask"].sum()),
                   "attention_kernel": kernel,
                   "model": f"ESM {shapes.check_esm['num_hidden_layers']}x{shapes.check_esm['hidden_size']}, "
                            f"LLaMA {shapes.check_llama['num_hidden_layers']}x{shapes.check_llama['hidden_size']}"}
        model = None  # the fp32 model's memory back before the bf16 one is built
        free()
    return out


# ---------------------------------------------------------------------------------------------- 2. attention

def check_attention(shapes: Shapes) -> dict:
    """Each packed-row kernel that runs here (model.attention_kernel) against the packed path in fp32 on the CPU,
    forward and backward, and its time beside one SDPA with the block-causal mask written out."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_p2t.transformer import attention
    h, g, d, s = shapes.attn_heads, shapes.attn_groups, shapes.attn_dim, shapes.pack_length
    cfg = TransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=g,
                            kv_channels=d, attention_dropout=0.0, use_cpu_initialization=True)
    module = lambda kernel: attention.SegmentAttention(cfg, 1, None, "self", kernel=kernel).eval()
    gen = torch.Generator().manual_seed(3)
    b = 2
    lengths = [[s // 2, s // 4, s // 8, s // 8 - 16], [s // 3, s // 3, s - 2 * (s // 3) - 8]]
    seg = torch.zeros(b, s, dtype=torch.long)
    for r, row in enumerate(lengths):
        at = 0
        for j, n in enumerate(row):
            seg[r, at:at + n] = j + 1
            at += n
    real = (seg > 0).t()[..., None]                            # [s, b, 1]: padding rows are zeros in every path
    q = torch.randn(s, b, h, d, generator=gen)
    k, v = torch.randn(s, b, g, d, generator=gen), torch.randn(s, b, g, d, generator=gen)
    w = torch.randn(s, b, h * d, generator=gen) * real         # the backward's incoming gradient

    def backward(fn, grad, *x):
        """fn's output and its inputs, their gradients filled by one backward of <output, grad>."""
        x = [t.detach().requires_grad_(True) for t in x]
        y = fn(*x)
        (y.float() * grad).sum().backward()
        return y.detach(), x
    ref, xs = backward(lambda *x: module("sdpa")(*x, seg), w, q, k, v)   # the packed path, fp32, CPU
    ref_g = [t.grad for t in xs]
    dev = device()
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    qd, kd, vd, segd, wd = q.to(dev, dt), k.to(dev, dt), v.to(dev, dt), seg.to(dev), w.to(dev)

    def dense(qq, kk, vv):
        """One SDPA per row with the block-causal mask written out, the plain alternative."""
        same = (segd[:, :, None] == segd[:, None, :]) & torch.ones(s, s, dtype=torch.bool, device=dev).tril()
        same &= (segd > 0)[:, :, None]
        rep = h // g
        qq, kk, vv = (x.permute(1, 2, 0, 3) for x in (qq, kk, vv))
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=same[:, None], scale=module("sdpa").scale)
        return o.nan_to_num().permute(2, 0, 1, 3).reshape(s, b, -1)

    kernels = {name: (lambda m: lambda *x: m(*x, segd))(module(name))     # named as model.attention_kernel's
               for name in [*attention.varlen_kernels(qd, 0.0), "sdpa"]}
    kernels["dense_block_mask"] = dense
    out = {"dtype": str(dt).replace("torch.", ""), "device": dev.type, "rows": b, "row_length": s,
           "heads": h, "kv_groups": g, "head_dim": d, "flash_attn_installed": "flash_attn" in kernels,
           "auto_kernel": attention.kernel_for("auto", qd, 0.0)[0]}
    for name, fn in kernels.items():
        try:
            y, xs = backward(fn, wd, qd, kd, vd)
            gr = [t.grad.float().cpu() for t in xs]
            with torch.no_grad():
                times = timed_steps(lambda: fn(qd, kd, vd), shapes)
            times_fb = timed_steps(lambda: backward(fn, wd, qd, kd, vd), shapes)
        except Exception as e:  # one kernel failing (an unsupported GPU, a signature) spares the others' figures
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        y = (y.float().cpu() * real)
        out[name] = {"rel_error_vs_cpu_fp32": rel(y, ref * real),
                     "max_abs_error": float((y - ref * real).abs().max()),
                     "grad_rel_error_vs_cpu_fp32": max(rel(a, r) for a, r in zip(gr, ref_g)),
                     "ms": 1e3 * float(np.median(times)), "fwd_bwd_ms": 1e3 * float(np.median(times_fb))}
    out["failed_kernels"] = [k for k, r in out.items() if isinstance(r, dict) and "error" in r]
    if not {"dense_block_mask", "sdpa"} & set(out["failed_kernels"]):
        out["per_sample_speedup_vs_dense"] = out["dense_block_mask"]["ms"] / out["sdpa"]["ms"]
    return out


# ---------------------------------------------------------------------------------------------- 5. structure

def _structure_encoder(esm: dict, dtype, chunk: int = 128):
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.models.esm_structure import StructureESMEncoder
    from megatron_p2t.models.parts_config import StructureConfig
    cfg = ESMConfig(esm["num_hidden_layers"], esm["hidden_size"], esm["num_attention_heads"], esm["intermediate_size"])
    return StructureESMEncoder(cfg, StructureConfig(kernels=128, chunk=chunk), params_dtype=dtype).to(device())


def _folded_batch(b: int, length: int, seed: int = 0):
    import random as _random
    from tests.synthetic import fold_coords
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (b, length + 2), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    coords = torch.zeros(b, length + 2, 3)
    known = torch.zeros(b, length + 2, dtype=torch.bool)
    rng = _random.Random(seed)
    for i in range(b):
        coords[i, 1:-1] = torch.from_numpy(fold_coords("alpha helix", length, rng))
        known[i, 1:-1] = True
    known[:, 5:9] = False                       # a gap in the structures
    dev = device()
    return ids.to(dev), torch.ones_like(ids, dtype=torch.bool).to(dev), coords.to(dev), known.to(dev)


def check_structure(shapes: Shapes) -> dict:
    from bench.common import set_core_attention, unfused_core_attention
    out = {}
    # precision: the check model's width, two proteins of twice the median length
    ids, mask, coords, known = _folded_batch(2, 2 * shapes.protein_median, seed=1)
    ref = None
    # a fixed random direction: the squared mean of LayerNorm-ed states is ~1 whatever the input, with no gradient
    w = torch.randn(*ids.shape, shapes.check_esm["hidden_size"], generator=torch.Generator().manual_seed(5))
    w = w.to(device())
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        enc = _structure_encoder(shapes.check_esm, dtype)
        if ref is not None:
            enc.load_state_dict(ref["state"])
        y = enc(ids, mask, coords, known)
        (y.float() * w).mean().backward()
        grads = torch.cat([p.grad.float().flatten().cpu() for p in enc.structure.parameters()])
        if ref is None:
            ref = {"state": {k: v.detach().clone() for k, v in enc.state_dict().items() if torch.is_tensor(v)},
                   "out": y.detach().float().cpu(), "grads": grads}
        else:
            out["precision"] = {"out_rel_error": rel(y.detach().float().cpu(), ref["out"]),
                                "grads_rel_error": rel(grads, ref["grads"])}
        enc = y = None
        free()
    # cost at the real shape: forward+backward, every weight trained (the warm-up's setting), bf16 on a GPU
    dt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    length = 1021 if shapes is REAL else 2 * shapes.protein_median
    ids, mask, coords, known = _folded_batch(2, length, seed=2)
    torch.manual_seed(0)
    enc = _structure_encoder(shapes.esm, dt)

    def measure(**kw):
        free()

        def step():
            enc(ids, mask, **kw).float().square().mean().backward()
            enc.zero_grad(set_to_none=True)
        return {"step_s": float(np.median(timed_steps(step, shapes))), "peak_gb": peak_gb()}
    out["plain"], out["bias"] = measure(), measure(coords=coords, coords_mask=known)
    # the same layers through megatron-core's unfused attention (what the encoders ran before SDPA)
    sdpa = set_core_attention(enc.block, unfused_core_attention(enc.block))
    out["plain_unfused"] = measure()
    set_core_attention(enc.block, sdpa)
    out.update(dtype=str(dt).replace("torch.", ""), proteins=2, residues=length,
               bias_time_ratio=out["bias"]["step_s"] / out["plain"]["step_s"],
               sdpa_speedup=out["plain_unfused"]["step_s"] / out["plain"]["step_s"])
    return out


def _decoder(llama: dict, dtype, moe=None, layers: int | None = None, fused: bool = False):
    from transformers import LlamaConfig

    from megatron_p2t.models import llama as llama_mod
    from megatron_p2t.parts.assemble import fusions
    shape = dict(llama, num_hidden_layers=layers or llama["num_hidden_layers"])
    hf = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    return llama_mod.build(hf, params_dtype=dtype, moe=moe, **fusions(fused)).to(device())


def check_moe(shapes: Shapes) -> dict:
    """The mixture-of-experts decoder (4 experts, top-1): bf16 vs fp32 on the check model (no capacity, so both
    route every token), and forward+backward of two layers at LLaMA-3.1-8B's width, dense vs MoE, on one packed
    row (every weight trained)."""
    from megatron_p2t.models.parts_config import MoEConfig
    out = {}
    moe = MoEConfig(capacity_factor=None, router_init_std=0.02)
    vocab = shapes.check_llama["vocab_size"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 256), generator=g).to(device())
    pos = torch.arange(256, device=device()).expand(2, -1)
    ref = None
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        m = _decoder(shapes.check_llama, dtype, moe)
        if ref is not None:
            m.load_state_dict(ref["state"])
        logits = m(input_ids=ids, position_ids=pos, attention_mask=None).float()
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        grads = torch.cat([p.grad.float().flatten().cpu() for n, p in m.named_parameters() if ".mlp." in n])
        if ref is None:
            ref = {"state": {k: v.detach().clone() for k, v in m.state_dict().items() if torch.is_tensor(v)},
                   "logits": logits.detach().cpu(), "grads": grads}
        else:
            out["precision"] = {"logits_rel_error": rel(logits.detach().cpu(), ref["logits"]),
                                "expert_grads_rel_error": rel(grads, ref["grads"])}
        m = logits = None
        free()
    dt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tokens = shapes.pack_length
    ids = torch.randint(0, shapes.llama["vocab_size"], (1, tokens), generator=g).to(device())
    pos = torch.arange(tokens, device=device())[None]
    for name, cfg in (("dense", None), ("moe", MoEConfig())):
        free()
        torch.manual_seed(0)
        m = _decoder(shapes.llama, dt, cfg, layers=2)

        def step():
            m(input_ids=ids, position_ids=pos, attention_mask=None, labels=ids).float().mean().backward()
            m.zero_grad(set_to_none=True)
        times = timed_steps(step, shapes)
        out[name] = {"step_s": float(np.median(times)), "peak_gb": peak_gb(),
                     "params": sum(p.numel() for p in m.parameters())}
        m = None
    out.update(dtype=str(dt).replace("torch.", ""), tokens=tokens, layers=2,
               moe_time_ratio=out["moe"]["step_s"] / out["dense"]["step_s"])
    return out


def check_fusion(shapes: Shapes, compile_kernels: bool = True) -> dict:
    """model.fused_kernels against the plain decoder: two layers at LLaMA-3.1-8B's width, one packed row, every
    weight trained; the same weights in both."""
    import contextlib

    import torch._dynamo
    dt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tokens = shapes.pack_length
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, shapes.llama["vocab_size"], (1, tokens), generator=g).to(device())
    pos = torch.arange(tokens, device=device())[None]
    out, ref = {}, None
    with contextlib.nullcontext() if compile_kernels else torch._dynamo.config.patch(disable=True):
        for name, fused in (("plain", False), ("fused", True)):
            free()
            torch.manual_seed(0)
            m = _decoder(shapes.llama, dt, layers=2, fused=fused)
            if ref is not None:
                m.load_state_dict(ref["state"])
            sync()
            t0 = time.perf_counter()       # the fused decoder's first step compiles its kernels
            loss = m(input_ids=ids, position_ids=pos, attention_mask=None, labels=ids).float().mean()
            loss.backward()
            sync()
            first = time.perf_counter() - t0
            grads = torch.cat([p.grad.float().flatten().cpu() for p in m.parameters() if p.grad is not None])
            if ref is None:
                ref = {"state": {k: v.detach().clone() for k, v in m.state_dict().items() if torch.is_tensor(v)},
                       "loss": float(loss), "grads": grads}
            else:
                out.update(loss_rel_error=abs(float(loss) - ref["loss"]) / abs(ref["loss"]),
                           grads_rel_error=rel(grads, ref["grads"]))
            m.zero_grad(set_to_none=True)
            grads = loss = None

            def step():
                m(input_ids=ids, position_ids=pos, attention_mask=None, labels=ids).float().mean().backward()
                m.zero_grad(set_to_none=True)
            times = timed_steps(step, shapes)
            out[name] = {"step_s": float(np.median(times)), "first_step_s": first, "peak_gb": peak_gb()}
            m = None
    out.update(dtype=str(dt).replace("torch.", ""), tokens=tokens, layers=2, compiled=compile_kernels,
               time_ratio=out["fused"]["step_s"] / out["plain"]["step_s"])
    return out


# ---------------------------------------------------------------------------------------------- 3. stage 2

def stage2_ours(shapes: Shapes, cfg, batch, counts) -> dict:
    from megatron_p2t.training import joined
    model, llama_cfg, esm_cfg, pcfg = build_ours(cfg)
    model.train()
    params = trainable(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    proj = sum(p.numel() for n, p in model.named_parameters() if n.startswith("connector."))
    from megatron_p2t.plan import Arch
    linear = sum(p.numel() for n, p in model.llm.named_parameters() if n.endswith("weight") and p.dim() == 2
                 and ".lora_" not in n and "embedding" not in n)
    formula = Arch.from_hf(llama_cfg).decoder_params()
    if linear != formula:  # the FLOP model's parameter formula, checked on the model
        raise AssertionError(f"decoder linear parameters: model {linear}, formula {formula}")
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())

    def step():
        loss, _ = joined.forward_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = timed_steps(step, shapes)
    flops = stage2_flops(llama_cfg, esm_cfg, counts["text"], counts["protein"], lora, proj)
    res = result(times, flops, counts["tokens"], shapes)
    res.update(rows=int(batch["input_ids"].shape[0]), token_slots=int(batch["input_ids"].numel()),
               micro_batches=1, lora_params=lora, peak_gb=peak_gb(), host_syncs=host_syncs(step))
    return res


def stage2_hf(shapes: Shapes, cfg, batch, counts) -> dict:
    """The official code's path: EsmModel + projector + LlamaForCausalLM (SDPA) with PEFT LoRA, padded batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import EsmModel, LlamaForCausalLM

    from megatron_p2t.hf.connector import Projector
    from megatron_p2t.parts.assemble import hf_configs, placeholder_id
    dev = device()
    dt = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    llama_cfg, esm_cfg, pcfg = hf_configs(cfg.model)  # the same parts and projector settings as ours
    llama_cfg._attn_implementation = esm_cfg._attn_implementation = "sdpa"
    before = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with dev:
            esm = EsmModel(esm_cfg, add_pooling_layer=False)
            proj = Projector(esm_cfg.hidden_size, pcfg.intermediate_dim, llama_cfg.hidden_size, dropout=pcfg.dropout)
            llama = LlamaForCausalLM(llama_cfg)
    finally:
        torch.set_default_dtype(before)
    esm.requires_grad_(False)
    lc = cfg.model.llm_lora
    llama = get_peft_model(llama, LoraConfig(r=lc.r, lora_alpha=lc.alpha or 2 * lc.r, lora_dropout=lc.dropout,
                                             target_modules=LORA_TARGETS_HF))
    llama.train()
    proj.train()
    pid = placeholder_id(cfg.model, cfg.data.text_tokenizer)
    params = [p for p in list(llama.parameters()) + list(proj.parameters()) if p.requires_grad]
    lora = sum(p.numel() for n, p in llama.named_parameters() if "lora_" in n)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())
    padded = hf_padded(batch)

    def micro(rows):
        """Rows of the padded batch, cut to their own longest sample, on the device."""
        b = {k: v[rows].to(dev) for k, v in padded.items()}
        w = int(b["attention_mask"].sum(1).max())
        return {k: (v[:, :w] if k in ("input_ids", "attention_mask", "labels") else v) for k, v in b.items()}

    def step(chunks):
        for b in chunks:
            prot = proj(esm(input_ids=b["protein_ids"], attention_mask=b["protein_mask"].long()).last_hidden_state)
            emb = llama.get_input_embeddings()(b["input_ids"])
            slots = (b["input_ids"] == pid).unsqueeze(-1).expand_as(emb)
            emb = emb.masked_scatter(slots, prot[b["protein_mask"]].to(emb.dtype))
            loss = llama(inputs_embeds=emb, attention_mask=b["attention_mask"], labels=b["labels"]).loss
            (loss / len(chunks)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = padded["input_ids"].shape[0]
    for k in (1, 2, 4):  # what an HF user does when the padded batch does not fit: accumulate smaller ones
        chunks = [micro(r) for r in torch.arange(n).chunk(k)]
        try:
            times = timed_steps(lambda: step(chunks), shapes)
            break
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            chunks = None
            free()
    else:
        raise RuntimeError("the HF + PEFT step does not fit even in 4 micro-batches")
    nproj = sum(p.numel() for p in proj.parameters())
    flops = stage2_flops(llama_cfg, esm_cfg, counts["text"], counts["protein"], lora, nproj)
    res = result(times, flops, counts["tokens"], shapes)
    res.update(rows=n, token_slots=sum(int(c["input_ids"].numel()) for c in chunks), micro_batches=len(chunks),
               lora_params=lora, peak_gb=peak_gb(), host_syncs=host_syncs(lambda: step(chunks)))
    return res


def result(times, flops: float, tokens: int, shapes: Shapes) -> dict:
    s = float(np.median(times))
    peak = peak_flops()
    return {"step_s": s, "tokens_per_s": tokens / s, "model_tflops": flops / s / 1e12,
            "mfu": flops / s / peak if peak else None, "steps_timed": len(times), "flops_per_step": flops}


def stage2(shapes: Shapes, work: str, tokenizer: str | None, kernel: str = "auto") -> dict:
    from megatron_p2t.data.instruct import collate_instruct
    from megatron_p2t.parts.assemble import placeholder_id
    esm_dir, llama_dir = hf_dirs(work, shapes.esm, shapes.llama, "real")
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg = run_config(shapes, esm_dir, llama_dir, tokenizer, dtype, kernel)
    pid = placeholder_id(cfg.model, cfg.data.text_tokenizer)
    enc, pids, pmask = samples(shapes, cfg_vocab(llama_dir), pid, shapes.samples)
    packed = collate_instruct(enc, pids, pmask, 0, pack=True, pack_length=shapes.pack_length)
    padded = collate_instruct(enc, pids, pmask, 0, pack=False)
    counts = {"text": [len(e.ids) for e in enc], "protein": pmask.sum(1).tolist(),
              "tokens": int(sum(len(e.ids) for e in enc))}
    out = {"samples": len(enc), "real_tokens": counts["tokens"], "dtype": dtype,
           "attention_kernel": kernel_taken(kernel, dtype),
           "lora": {"r": cfg.model.llm_lora.r, "targets": "all linears (q,k,v,o,gate,up,down)"}}
    out["ours_packed"] = stage2_ours(shapes, cfg, packed, counts)
    free()  # one implementation's model and optimizer are gone before the other's is built
    out["hf_peft_padded"] = stage2_hf(shapes, cfg, padded, counts)
    out["speedup_tokens_per_s"] = out["ours_packed"]["tokens_per_s"] / out["hf_peft_padded"]["tokens_per_s"]
    return out


def cfg_vocab(llama_dir: str) -> int:
    return json.load(open(os.path.join(llama_dir, "config.json")))["vocab_size"]


# ---------------------------------------------------------------------------------------------- 4. stage 1

def stage1(shapes: Shapes, work: str, tokenizer: str | None, kernel: str = "auto") -> dict:
    from megatron_p2t import parts
    from megatron_p2t.models.align import AlignModel
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.parallel.state import current
    from megatron_p2t.parts.assemble import dtype_of, hf_configs
    from megatron_p2t.training.align import align_loss
    esm_dir, llama_dir = os.path.join(work, "real", "esm"), os.path.join(work, "real", "llama")
    cfg = run_config(shapes, esm_dir, llama_dir, tokenizer, "bfloat16" if torch.cuda.is_available() else "float32")
    llama_cfg, esm_cfg, pcfg = hf_configs(cfg.model)
    torch.manual_seed(0)
    mcfg = dataclasses.replace(cfg.model, attention_kernel=kernel)
    model = AlignModel(mcfg, parts.of(mcfg), ESMConfig.from_hf(esm_cfg), llama_cfg, pcfg, cfg.align,
                       params_dtype=dtype_of(cfg.model), text_side=True, layout=current()).to(device()).train()
    n = shapes.align_batch
    enc, pids, pmask = samples(shapes, llama_cfg.vocab_size, llama_cfg.vocab_size, n, seed=2)
    rng = np.random.default_rng(4)
    tl = [int(np.clip(rng.lognormal(math.log(shapes.answer_median * 1.5), 0.6), 8, cfg.data.max_text_tokens))
          for _ in range(n)]
    tids = torch.zeros(n, max(tl), dtype=torch.long)
    tmask = torch.zeros(n, max(tl), dtype=torch.bool)
    for i, L in enumerate(tl):
        tids[i, :L] = torch.from_numpy(rng.integers(0, min(llama_cfg.vocab_size, 128000), L))
        tmask[i, :L] = True
    dev = device()
    base = {"protein_ids": pids.to(dev), "protein_mask": pmask.to(dev)}
    cached = dict(base, text_mean=torch.randn(n, llama_cfg.hidden_size, device=dev),
                  text_std=torch.rand(n, llama_cfg.hidden_size, device=dev))
    computed = dict(base, text_ids=tids.to(dev), text_mask=tmask.to(dev))
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())
    nproj = sum(p.numel() for p in model.connector.parameters())
    out = {"batch": n, "dtype": cfg.model.dtype, "text_layer": cfg.align.text_layer}
    for name, batch, unpad in (("text_cache", cached, True), ("text_computed", computed, True),
                               ("text_cache_padded", cached, False)):   # ESM on the padded batch, as before
        model.esm.unpad = unpad

        def step():
            loss, _ = align_loss(model, batch, cfg.align)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times = timed_steps(step, shapes)
        # the projector's backward is all that trains; the text side runs forward only, without output layer
        flops = stage2_flops(llama_cfg, esm_cfg, tl if name == "text_computed" else [], pmask.sum(1).tolist(),
                             0, nproj, text_layers=cfg.align.text_layer, backward=False)     # real tokens only
        r = result(times, flops, n, shapes)
        r["samples_per_s"] = r.pop("tokens_per_s")
        r["peak_gb"] = peak_gb()
        out[name] = r
    model.esm.unpad = True
    out["cache_speedup"] = out["text_cache"]["samples_per_s"] / out["text_computed"]["samples_per_s"]
    out["unpad_speedup"] = out["text_cache"]["samples_per_s"] / out["text_cache_padded"]["samples_per_s"]
    out["padding_fraction"] = 1 - float(pmask.sum()) / pmask.numel()
    out["attention_kernel"] = kernel_taken(kernel, cfg.model.dtype)
    return out


# ---------------------------------------------------------------------------------------------- report

def environment() -> dict:
    import importlib.metadata as md
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "peak_bf16_tflops": (peak_flops() or 0) / 1e12 or None}
    for pkg in ("megatron-core", "deepspeed", "webdataset", "transformers", "peft", "flash-attn"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def matmul_tflops(tiny: bool) -> float:
    """The chip's bf16 matrix-product rate as torch reaches it (the ceiling a step could approach)."""
    n = 512 if tiny else 8192
    dt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    a, b = torch.randn(n, n, device=device(), dtype=dt), torch.randn(n, n, device=device(), dtype=dt)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12


_f = lambda x, k=3: "-" if x is None else f"{x:.{k}g}"
_pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"


def md_precision(p: dict) -> list:
    return [f"Precision ({p['model']}, {p['answer_tokens']} answer tokens, random weights): bf16 vs fp32",
            "", "| loss fp32 | loss bf16 | loss rel. error | logits rel. error | gradients rel. error |",
            "|---|---|---|---|---|",
            f"| {p['loss_fp32']:.5f} | {p['loss_bf16']:.5f} | {p['loss_rel_error']:.2e} | "
            f"{p['logits_rel_error']:.2e} | {p['grads_rel_error']:.2e} |"]


def md_attention(a: dict) -> list:
    lines = [f"Packed attention ({a['rows']} rows x {a['row_length']}, {a['heads']} heads / {a['kv_groups']} kv "
             f"groups x {a['head_dim']}, {a['dtype']} on {a['device']}) against the packed path in fp32 on the CPU; "
             f"model.attention_kernel=auto takes {a['auto_kernel']} here",
             "", "| kernel | rel. error | max abs error | gradients rel. error | forward ms | forward+backward ms |",
             "|---|---|---|---|---|---|"]
    for k in ("flash_attn", "torch_varlen", "sdpa", "dense_block_mask"):
        r = a.get(k)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {k} | failed: `{r['error'][:200]}` | | | | |")
            continue
        lines.append(f"| {k} | {r['rel_error_vs_cpu_fp32']:.2e} | {r['max_abs_error']:.2e} | "
                     f"{r['grad_rel_error_vs_cpu_fp32']:.2e} | {r['ms']:.3f} | {r['fwd_bwd_ms']:.3f} |")
    return lines


def md_stage2(s2: dict) -> list:
    lines = [f"Stage 2 step ({s2['samples']} samples, {s2['real_tokens']} real tokens, {s2['dtype']}, LoRA r "
             f"{s2['lora']['r']} on {s2['lora']['targets']}, ESM frozen, projector trained, AdamW; our packed rows' "
             f"attention: {s2['attention_kernel']})", "",
             "| implementation | rows x width (micro-batches) | step s | real tokens/s | model TFLOP/s | MFU | peak GB "
             "| host syncs / step |", "|---|---|---|---|---|---|---|---|"]
    for k, label in (("ours_packed", "ours: megatron-core, packed rows"),
                     ("hf_peft_padded", "HF + PEFT, padded batch (SDPA)")):
        r = s2[k]
        lines.append(f"| {label} | {r['rows']} x {r['token_slots'] // r['rows']} ({r['micro_batches']}) | "
                     f"{r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {_f(r['model_tflops'])} | {_pct(r['mfu'])} | {_f(r['peak_gb'])} | "
                     f"{'-' if r['host_syncs'] is None else r['host_syncs']} |")
    return lines + ["", f"Ratio: ours / HF + PEFT = {s2['speedup_tokens_per_s']:.2f}x tokens/s."]


def md_stage1(s1: dict) -> list:
    lines = [f"Stage 1 step (ESM + projector, batch {s1['batch']}, {s1['dtype']}; text side = LLaMA's first "
             f"{s1['text_layer']} layers; proteins {s1['padding_fraction']:.0%} padding, run without it through "
             f"{s1['attention_kernel']})", "",
             "| text side | step s | samples/s | model TFLOP/s | MFU | peak GB |", "|---|---|---|---|---|---|"]
    for k, label in (("text_cache", "text cache"), ("text_computed", "text computed"),
                     ("text_cache_padded", "text cache, ESM on the padded batch")):
        r = s1[k]
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['samples_per_s']:,.1f} | "
                     f"{_f(r['model_tflops'])} | {_pct(r['mfu'])} | {_f(r['peak_gb'])} |")
    return lines + ["", f"Ratios: text cache / computed = {s1['cache_speedup']:.2f}x samples/s; ESM unpadded / "
                        f"padded = {s1['unpad_speedup']:.2f}x."]


def md_structure(st: dict) -> list:
    return [f"Structure-aware encoder (128 kernels): bf16 vs fp32 output rel. error "
            f"{st['precision']['out_rel_error']:.2e}, distance-bias gradients {st['precision']['grads_rel_error']:.2e}; "
            f"forward+backward at {st['proteins']} x {st['residues']} residues ({st['dtype']})", "",
            "| encoder | step s | peak GB |", "|---|---|---|",
            f"| ESM-2 (no coordinates) | {st['plain']['step_s']:.3f} | {_f(st['plain']['peak_gb'])} |",
            f"| ESM-2 + distance bias | {st['bias']['step_s']:.3f} | {_f(st['bias']['peak_gb'])} |",
            f"| ESM-2, megatron-core's unfused attention | {st['plain_unfused']['step_s']:.3f} | "
            f"{_f(st['plain_unfused']['peak_gb'])} |", "",
            f"Ratios: with / without the bias = {st['bias_time_ratio']:.2f}x step time; unfused / SDPA attention = "
            f"{st['sdpa_speedup']:.2f}x."]


def md_moe(mo: dict) -> list:
    return [f"Mixture-of-experts decoder (4 experts, top-1): bf16 vs fp32 logits rel. error "
            f"{mo['precision']['logits_rel_error']:.2e}, MLP gradients {mo['precision']['expert_grads_rel_error']:.2e}; "
            f"forward+backward of {mo['layers']} layers at LLaMA-3.1-8B's width, {mo['tokens']} tokens "
            f"({mo['dtype']})", "", "| decoder | parameters | step s | peak GB |", "|---|---|---|---|",
            f"| dense | {mo['dense']['params']:,} | {mo['dense']['step_s']:.3f} | {_f(mo['dense']['peak_gb'])} |",
            f"| 4 experts, top-1 | {mo['moe']['params']:,} | {mo['moe']['step_s']:.3f} | "
            f"{_f(mo['moe']['peak_gb'])} |", "",
            f"Ratio: MoE / dense = {mo['moe_time_ratio']:.2f}x step time."]


def md_fusion(fu: dict) -> list:
    row = lambda k: (f"| {k} | {fu[k]['step_s']:.3f} | {fu[k]['first_step_s']:.2f} | {_f(fu[k]['peak_gb'])} |")
    return [f"Fused kernels (model.fused_kernels: SwiGLU, bias-dropout-add"
            f"{'' if fu['compiled'] else '; not compiled'}) vs plain: forward+backward of {fu['layers']} layers at "
            f"LLaMA-3.1-8B's width, {fu['tokens']} tokens ({fu['dtype']}); loss rel. difference "
            f"{fu['loss_rel_error']:.2e}, gradients {fu['grads_rel_error']:.2e}",
            "", "| decoder | step s | first step s | peak GB |", "|---|---|---|---|", row("plain"), row("fused"),
            "", f"Ratio: fused / plain = {fu['time_ratio']:.2f}x step time."]


def markdown(res: dict) -> str:
    """The report: a paragraph and table per section that ran; a section that failed says so (its error)."""
    e = res["environment"]
    peak = f" (data-sheet peak {e['peak_bf16_tflops']:.0f})" if e["peak_bf16_tflops"] else ""
    lines = [f"Device: {e['device']}; torch {e['torch']}, megatron-core {e['megatron-core']}, deepspeed "
             f"{e['deepspeed']}, transformers {e['transformers']}, peft {e['peft']}, flash-attn {e['flash-attn']}; "
             f"measured bf16 matmul {_f(res['matmul_tflops'], 4)} TFLOP/s{peak}.", ""]
    for name, render in SECTIONS_MD:
        r = res.get(name)
        if r is None:
            continue
        lines += ([f"**{name}: failed** after {r['section_s']:.0f} s: `{r['error']}`"] if "error" in r
                  else render(r)) + [""]
    return "\n".join(lines)


SECTIONS_MD = (("precision", md_precision), ("attention", md_attention), ("stage2", md_stage2),
               ("stage1", md_stage1), ("structure", md_structure), ("moe", md_moe), ("fusion", md_fusion))


def write_report(res: dict, out: str) -> None:
    with open(os.path.join(out, "check.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "check.md"), "w") as f:
        f.write(markdown(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes on whatever device there is (CPU in tests)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"))
    ap.add_argument("--only", nargs="*", default=[n for n, _ in SECTIONS_MD])
    a = ap.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        ap.error("no GPU here: the real shapes need one (use --tiny for the toy run)")
    shapes = TINY if a.tiny else REAL
    os.makedirs(a.out, exist_ok=True)
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    state.initialize(ParallelConfig())
    t_start = time.perf_counter()
    res = {"environment": environment(), "tiny": a.tiny, "matmul_tflops": matmul_tflops(a.tiny)}
    print(json.dumps(res), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        tok = None
        if a.tiny:  # a real-vocabulary model is 128,256 wide; the toy one takes a toy tokenizer's size
            t = tiny_tokenizer(work)
            tok = os.path.join(work, "tokenizer")
            shapes = dataclasses.replace(shapes, llama=dict(shapes.llama, vocab_size=len(t)),
                                         check_llama=dict(shapes.check_llama, vocab_size=len(t)))
        # attention first: the model sections then avoid a kernel it saw fail here (attention_kernel)
        for name, fn in (("attention", lambda s, w, t: check_attention(s)),
                         ("precision", lambda s, w, t: check_precision(s, w, t, attention_kernel(res))),
                         ("stage2", lambda s, w, t: stage2(s, w, t, attention_kernel(res))),
                         ("stage1", lambda s, w, t: stage1(s, w, t, attention_kernel(res))),
                         ("structure", lambda s, w, t: check_structure(s)), ("moe", lambda s, w, t: check_moe(s)),
                         ("fusion", lambda s, w, t: check_fusion(s, compile_kernels=not a.tiny))):
            if name not in a.only:
                continue
            t0 = time.perf_counter()
            free()
            try:
                res[name] = fn(shapes, work, tok)
            except Exception as e:  # the loan is short: one section's failure (an OOM, a kernel) spares the rest
                res[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                             "traceback": traceback.format_exc()[-6000:]}
                print(res[name]["traceback"], file=sys.stderr, flush=True)
            res[name]["section_s"] = time.perf_counter() - t0
            res["total_s"] = time.perf_counter() - t_start
            print(json.dumps({name: res[name]}, default=str), flush=True)
            write_report(res, a.out)       # what is done so far survives a timeout
    print(markdown(res))
    state.destroy()
    failed = [n for n in a.only if "error" in res.get(n, {}) or res.get(n, {}).get("failed_kernels")]
    if failed:
        print(f"failed sections: {', '.join(failed)} (their errors are in check.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
