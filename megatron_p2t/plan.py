"""Capacity planner: for a run config and a number of GPUs, memory per GPU and an estimated step time for every
layout it plans (TP inside a node x DP; stage 2 can also run pipeline-parallel, which it does not model).

Memory per GPU, in the model's dtype where not said otherwise:
- frozen weights (ESM, LLaMA; in stage 1 only the text layers, or none with the text cache) / TP;
- trainable weights (projector, LoRA) / TP, their gradients, and AdamW's state (fp32 master copy + two moments
  in mixed precision; the moments and DeepSpeed's fp32 partition in fp32), divided over DP by the ZeRO stage;
- activations for one micro-batch: stage 1 keeps only the projector's (the towers are frozen and run without
  saving anything) plus the largest transient of a frozen layer (unfused attention scores for ESM); stage 2 keeps
  every decoder layer's inputs for backward (LoRA needs the gradient through all of them) and fp32 logits;
- a fixed overhead per device (CUDA context, NCCL buffers, allocator slack).
A mixture-of-experts decoder (model.decoder=llama_moe): each layer's dense MLP becomes model.moe.experts trained
experts (split over parallel.expert data-parallel ranks, then over TP) and a router; under expert parallelism the
experts' gradients stay whole on each rank and their optimizer state is partitioned over the ranks holding the same
experts (data-parallel size / parallel.expert, training/experts.py); a token's MLP
activations and FLOPs count top_k experts, times TP (without sequence parallelism every TP rank's experts see all
tokens, models/llama_moe.py).
Step time: the step's FLOPs (decoder_flops / encoder_flops / trained_flops below, the one FLOP model, which
bench/gpu/check.py's MFU also counts with) over the device's dense bf16 peak times a stated MFU.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

from megatron_p2t import parts

GIB = 1024 ** 3


class PlanError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Device:
    memory_gib: float
    peak_tflops: float      # dense bf16 (GPU) or fp32 (CPU) per device
    overhead_gib: float     # CUDA context + NCCL buffers + allocator slack
    gpus_per_node: int = 8


DEVICES = {
    "h100-80gb": Device(80, 989.0, 5.0),
    "h200-141gb": Device(141, 989.0, 5.0),
    "a100-80gb": Device(80, 312.0, 5.0),
    "cpu": Device(24, 1.0, 0.0, gpus_per_node=1),
}


@dataclasses.dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated: bool            # SwiGLU (LLaMA) vs GELU MLP (ESM)
    bias: bool
    tied: bool = True

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def layer_matrix_params(self) -> int:
        h, f = self.hidden, self.ffn
        attn = h * (h + 2 * self.kv_dim) + h * h
        mlp = (3 if self.gated else 2) * h * f
        bias = (h + 2 * self.kv_dim + h + (2 * f if self.gated else f) + h) if self.bias else 0
        return attn + mlp + bias

    def layer_norm_params(self) -> int:
        return 4 * self.hidden if self.bias else 2 * self.hidden

    @classmethod
    def from_hf(cls, c) -> "Arch":
        """From a transformers config (or its config.json as a dict): ESM's or a LLaMA's."""
        get = (lambda k, d=None: c.get(k, d)) if isinstance(c, dict) else (lambda k, d=None: getattr(c, k, d))
        esm = get("model_type") == "esm"
        return cls(get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads"),
                   get("num_key_value_heads") or get("num_attention_heads"), get("intermediate_size"),
                   get("vocab_size"), gated=not esm, bias=esm, tied=esm or bool(get("tie_word_embeddings")))

    def decoder_params(self) -> int:
        """The weight matrices a decoder holds: its layers' and an untied output layer (no embedding)."""
        return self.layers * self.layer_matrix_params() + (0 if self.tied else self.vocab * self.hidden)


# -- the one FLOP model: the planner's step time and the GPU check's MFU (bench/gpu/check.py) both count with it.
# A frozen weight costs 2 FLOPs per token forward and 2 for the input gradient in backward (no weight gradient); a
# trained one 6. Attention: 4*h FLOPs per query-key pair per layer forward (scores and context), twice that in
# backward; a causal sequence of L has L(L+1)/2 pairs, a bidirectional one L^2.

def decoder_flops(a: Arch, lengths, layers: Optional[int] = None, output_layer: bool = True,
                  backward: bool = True) -> float:
    """A causal decoder over sequences of these lengths: `layers` of its layers (default all) and the output
    layer (the logits matmul is paid whether or not its weight is tied to the embedding); frozen weights."""
    layers = a.layers if layers is None else layers
    n = layers * a.layer_matrix_params() + (a.vocab * a.hidden if output_layer else 0)
    tokens = float(sum(lengths))
    attn = sum(2.0 * a.hidden * L * (L + 1) for L in lengths) * layers
    return 2 * n * tokens + attn + ((2 * n * tokens + 2 * attn) if backward else 0.0)


def encoder_flops(a: Arch, lengths, backward: bool = False, recomputed: bool = False) -> float:
    """A bidirectional encoder (ESM) over sequences of these lengths, frozen weights: forward, and with `backward`
    the input gradients through every layer (and its forward again when `recomputed`)."""
    n = a.layers * a.layer_matrix_params()
    tokens = float(sum(lengths))
    attn = sum(4.0 * a.hidden * L * L for L in lengths) * a.layers
    fwd = 2 * n * tokens + attn
    return fwd + ((2 * n * tokens + 2 * attn + (fwd if recomputed else 0.0)) if backward else 0.0)


def trained_flops(params: float, tokens: float) -> float:
    """Weights that train fully (a connector, LoRA adapters, experts): 6 FLOPs per weight per token."""
    return 6.0 * params * tokens


# The public checkpoints, so production configs plan without the weights on disk (local config.json wins).
KNOWN = {
    "esm2_t36_3B_UR50D": Arch(36, 2560, 40, 40, 10240, 33, gated=False, bias=True),
    "esm2_t33_650M_UR50D": Arch(33, 1280, 20, 20, 5120, 33, gated=False, bias=True),
    "Llama-3.1-8B-Instruct": Arch(32, 4096, 32, 8, 14336, 128256, gated=True, bias=False, tied=False),
    "Llama-3.2-1B-Instruct": Arch(16, 2048, 32, 8, 8192, 128256, gated=True, bias=False, tied=True),
    "Llama-2-7b-hf": Arch(32, 4096, 32, 32, 11008, 32000, gated=True, bias=False, tied=False),   # ProLLaMA's base
}
NO_ENCODER = Arch(0, 0, 1, 1, 0, 0, gated=False, bias=False)   # a decoder-only recipe's (model.encoder=none)


def arch_of(path: str) -> Arch:
    cfg_file = os.path.join(path, "config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            return Arch.from_hf(json.load(f))
    name = os.path.basename(path.rstrip("/"))
    if name in KNOWN:
        return KNOWN[name]
    raise PlanError(f"{path}: no config.json there and not a known checkpoint name ({sorted(KNOWN)}); point "
                    f"model.encoder_path / model.llama at a local HF directory")


@dataclasses.dataclass
class Plan:
    stage: str
    tp: int
    pp: int
    dp: int
    ep: int
    micro_batch: int
    global_batch: int
    memory: Dict[str, float]      # bytes per device, by part
    flops_per_step: float
    step_s: float
    samples_s: float
    fits: bool
    recompute: str = ""           # model.recompute, where the step runs the decoder: "full, uniform x 1"

    @property
    def total(self) -> float:
        return sum(self.memory.values())


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16", "bf16", "fp16") else 4


def _lora_params(a: Arch, lora, tp: int) -> float:
    """Per layer, per TP rank: fused QKV and gate/up share one A (replicated), B sharded like the output."""
    if not lora.r:
        return 0.0
    h, f, r = a.hidden, a.ffn, lora.r
    n = 0.0
    for t in lora.targets:
        if t == "linear_qkv":
            n += r * h + (h + 2 * a.kv_dim) * r / tp
        elif t == "linear_proj":
            n += r * h / tp + h * r
        elif t == "linear_fc1":
            n += r * h + (2 if a.gated else 1) * f * r / tp
        elif t == "linear_fc2":
            n += r * f / tp + h * r
    return n * a.layers


def connector_params(model_cfg, esm_hidden: int, llm_hidden: int, tp: int) -> float:
    """Parameters of the connector on one tensor-parallel rank (matrices split, norms and latents whole): its
    part's count."""
    return parts.connector(model_cfg.connector).params(model_cfg, esm_hidden, llm_hidden, tp)


def connector_split(model_cfg) -> int:
    """What the connector splits over tensor-parallel ranks (heads for the resampler, the hidden width for the
    projector; mlp2x_gelu splits the LLM width, as the decoder does): its part says."""
    return parts.connector(model_cfg.connector).split(model_cfg)


def prompt_tokens(cfg) -> int:
    """Stage 2's tokens around the placeholders and the answer (chat template, system prompt, name, taxon), from
    the configured tokenizer when it is on disk; else LLaMA-3's count for the default prompt."""
    tok_dir = cfg.data.text_tokenizer
    if not tok_dir or not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
        return 96
    from megatron_p2t.data.instruct import PromptBuilder
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    builder = PromptBuilder(load_text_tokenizer(tok_dir), cfg.instruct, cfg.model.placeholder_token)
    return len(builder.prompt_ids({"name": "Uncharacterized protein", "organism": "Homo sapiens (Human)"}, "k", 0))


def _attention_only(lora):
    """An MoE decoder's adapters: its MLPs are experts, trained fully (models/lora.py leaves them unadapted)."""
    return dataclasses.replace(lora, targets=[t for t in lora.targets if t not in ("linear_fc1", "linear_fc2")])


def plan(cfg, stage: str, tp: int, dp: int, device: Device, mfu: float = 0.4) -> Plan:
    enc, _, dec = parts.of(cfg.model)
    decoder_only = not enc.reads_protein
    moe = dec.moe(cfg.model)
    ep = cfg.parallel.expert if moe is not None else 1
    esm, llama = encoder_arch(cfg), arch_of(cfg.model.llama)
    wb = _dtype_bytes(cfg.model.dtype)
    b = cfg.data.batch_size or 1
    lp = 0 if decoder_only else cfg.data.max_protein_residues + 2
    lt = cfg.data.max_text_tokens + 1
    zero = cfg.train.zero_stage
    inter = cfg.model.projector.intermediate_dim
    proj = connector_params(cfg.model, esm.hidden, llama.hidden, tp)

    def tower(a: Arch, layers: int, embed: bool, head: bool) -> float:
        n = layers * (a.layer_matrix_params() / tp + a.layer_norm_params())
        return n + (a.vocab * a.hidden / tp if embed else 0) + (a.vocab * a.hidden / tp if head else 0)

    frozen = tower(esm, esm.layers, True, False)
    trainable = proj + _lora_params(esm, cfg.model.esm_lora, tp)
    structure_trained = enc.structure and not cfg.model.freeze.structure
    if structure_trained:   # the distance bias: kernels, Linear k->k, the per-head layer (split), the embedding term
        k = cfg.model.structure.kernels
        trainable += 2 * k + k * k + k + (k + 1) * esm.heads / tp + (k + 1) * esm.hidden
    # feature alignment (Protein2Text's stage 1) is stage 2's step through the whole frozen decoder, without LoRA;
    # a decoder-only recipe's stage 1 (lm) trains its own LoRA and modules_to_save on documents up to a row long
    objective = parts.align_objective(cfg.align.objective, cfg.model) if stage == "align" else None
    hscale = objective == "hscale"
    llm_lora = cfg.model.llm_lora if objective in (None, "lm") else dataclasses.replace(cfg.model.llm_lora, r=0)
    if hscale:
        if not cfg.align.use_text_cache:
            frozen += tower(llama, cfg.align.text_layer, True, False)
        tokens = b * lp
    else:
        frozen += tower(llama, llama.layers, True, not llama.tied)
        trainable += _lora_params(llama, llm_lora if moe is None else _attention_only(llm_lora), tp)
        if llm_lora.r:   # the embedding / output layer trained fully, vocabulary-parallel
            trainable += len(llm_lora.modules_to_save) * llama.vocab * llama.hidden / tp
        if objective == "lm":
            seq = cfg.instruct.pack_length or lt   # documents: a row at most (the planned bound)
        elif decoder_only:
            seq = 2 * lt                           # plain prompts hold a protein as text, about an answer long
        else:
            slots = parts.slots(cfg.model, cfg.data.max_protein_residues)
            seq = slots + lt + prompt_tokens(cfg)   # loads the tokenizer: once per plan
        tokens = b * seq

    experts = 0.0
    if moe is not None and not hscale:   # the dense MLPs give way to trained experts and routers
        mlp = (3 if llama.gated else 2) * llama.hidden * llama.ffn
        frozen -= llama.layers * mlp / tp
        experts = llama.layers * (moe.experts / ep * mlp / tp + moe.experts * llama.hidden)
        if not llm_lora.r:                # feature alignment: the decoder, experts included, stays frozen
            frozen, experts = frozen + experts, 0.0
    # AdamW: two fp32 moments, plus DeepSpeed's fp32 partition of the weights (the master copy in mixed precision);
    # experts under expert parallelism partition theirs over the ranks holding the same experts (training/experts.py)
    opt_bytes = 12
    opt_dp = dp if zero >= 1 else 1
    mem = {"frozen_weights": frozen * wb,
           "trainable_weights": (trainable + experts) * wb / (dp if zero >= 3 else 1),
           "gradients": (trainable + experts) * wb / (dp if zero >= 2 and ep == 1 else 1),
           "optimizer": trainable * opt_bytes / opt_dp + experts * opt_bytes / (opt_dp if ep == 1 else dp // ep)}

    # activations of one micro-batch
    esm_transient = b * lp * (2 * esm.hidden + esm.ffn / tp) * wb      # SDPA: no [L, L] scores (padded_attention)
    if esm_backward(cfg, stage):     # the gradient runs back through every ESM layer, which keeps its activations
        per_layer = esm_layer_activations(esm, cfg.model.esm_lora, wb, tp)
        # recomputed (model.recompute.encoder): each layer's input, and one layer's activations during its backward
        esm_transient = b * lp * (esm.layers * esm.hidden * wb + per_layer if cfg.model.recompute.encoder
                                  else esm.layers * per_layer)
    esm_out = b * lp * esm.hidden * wb * 2
    proj_saved = b * lp * (esm.hidden + 2 * inter / tp + 2 * llama.hidden) * wb
    if hscale:
        act = esm_transient + esm_out + proj_saved
        if not cfg.align.use_text_cache:
            act += b * lt * (2 * llama.hidden + 3 * llama.ffn / tp) * wb
    else:
        h, f, kvd = llama.hidden, llama.ffn, llama.kv_dim
        per_token_layer = wb * (6 * h + (h + 2 * kvd) / tp + h / tp + 4 * f / tp)
        if llm_lora.r and llm_lora.dropout:
            per_token_layer += (wb + 1) * (3 * h + f / tp)
        if moe is not None:                                   # top_k experts per token, tp copies of it
            per_token_layer += wb * 4 * f / tp * (moe.top_k * tp - 1) + wb * 2 * moe.experts
        logits = tokens * llama.vocab / tp * 4 * 2           # fp32 logits and their gradient
        dec_act = tokens * decoder_kept_per_token(cfg.model.recompute, llama.layers, h * wb, per_token_layer)
        act = dec_act + logits + esm_transient + esm_out + proj_saved
    if enc.structure:
        # the distance bias: [heads / tp, L, L] kept per protein (and its gradient when trained), plus one
        # checkpointed chunk of the [rows, L, kernels] expansion and its MLP (about five such tensors, fp32)
        k, rows = cfg.model.structure.kernels, min(cfg.model.structure.chunk, lp)
        act += b * esm.heads / tp * lp * lp * wb * (2 if structure_trained else 1) + 5 * b * rows * lp * k * 4
    mem["activations"] = act
    mem["overhead"] = device.overhead_gib * GIB

    # FLOPs of one optimizer step on one model replica, from the one FLOP model above
    accum = cfg.train.global_batch // (b * dp) if cfg.train.global_batch else cfg.train.grad_accum
    proteins = [lp] * b
    flops = encoder_flops(esm, proteins, backward=esm_backward(cfg, stage), recomputed=cfg.model.recompute.encoder)
    flops += trained_flops(proj * tp, b * lp)
    if hscale:
        if not cfg.align.use_text_cache:
            flops += decoder_flops(llama, [lt] * b, layers=cfg.align.text_layer, output_layer=False, backward=False)
    else:
        flops += decoder_flops(llama, [seq] * b)
        # recomputed layers run their forward a second time in backward
        layers_fwd = decoder_flops(llama, [seq] * b, output_layer=False, backward=False)
        if moe is not None:     # top_k experts per token (their weights trained: 6 per parameter) and the router
            mlp = (3 if llama.gated else 2) * llama.hidden * llama.ffn
            flops += llama.layers * tokens * (mlp * (6 * moe.top_k * tp - 4) + 6 * moe.experts * llama.hidden)
            layers_fwd += llama.layers * tokens * (mlp * (2 * moe.top_k * tp - 2) + 2 * moe.experts * llama.hidden)
        flops += layers_fwd * recomputed_layers(cfg.model.recompute, llama.layers) / llama.layers
    flops *= accum
    step_s = flops / (tp * device.peak_tflops * 1e12 * mfu)           # a replica is tp devices
    global_batch = b * dp * accum
    return Plan(stage, tp, 1, dp, ep, b, global_batch, mem, flops * dp, step_s, global_batch / step_s,
                sum(mem.values()) <= device.memory_gib * GIB, recompute_label(cfg, stage, hscale))


def recompute_label(cfg, stage: str, hscale: bool) -> str:
    """What model.recompute recomputes in this stage's step: "full, uniform x 1" (the decoder), "ESM", both, or ""."""
    rc, what = cfg.model.recompute, []
    if rc.granularity != "none" and not hscale:
        what.append(f"{rc.granularity}, {rc.method} x {rc.num_layers}")
    if rc.encoder and esm_backward(cfg, stage):
        what.append("ESM")
    return "; ".join(what)


def esm_backward(cfg, stage: str) -> bool:
    """Whether a step takes gradients through the ESM layers: its LoRA trains in stage 1 (stage 2 carries it
    frozen), or the structure-aware encoder's distance bias trains (it enters every layer's attention)."""
    return bool((stage == "align" and cfg.model.esm_lora.r) or
                (parts.encoder(cfg.model.encoder).structure and not cfg.model.freeze.structure))


def esm_layer_activations(esm: Arch, lora, wb: int, tp: int) -> float:
    """Bytes an ESM layer keeps per token for backward (counted with autograd's saved-tensor hooks on CPU): the
    LayerNorm and residual inputs, q/k/v and the attention context, the GELU input (frozen linears keep no input),
    what each adapter reads, and SDPA's fp32 log-sum-exp per head (transformer/padded_attention.py; megatron's
    unfused attention kept [heads / tp, L] scores twice per token instead)."""
    h, f = esm.hidden, esm.ffn
    reads = {"linear_qkv": h, "linear_proj": h / tp, "linear_fc1": h, "linear_fc2": f / tp}
    return wb * (4 * h + 4 * h / tp + f / tp + sum(reads.get(t, 0) for t in lora.targets if lora.r)) + \
        esm.heads / tp * 4


def decoder_kept_per_token(recompute, layers: int, input_bytes: float, layer_bytes: float) -> float:
    """Bytes the decoder keeps per token for backward: every layer's activations (layer_bytes each), or, for a
    recomputed layer, its input (input_bytes) and, while one recomputed chunk runs its backward, that chunk's."""
    recomputed = recomputed_layers(recompute, layers)
    chunk = (recompute.num_layers if recompute.method == "uniform" else 1) if recomputed else 0
    return (layers - recomputed) * layer_bytes + recomputed * input_bytes + chunk * layer_bytes


def recomputed_layers(recompute, layers: int) -> int:
    """Decoder layers model.recompute runs again in backward (one pipeline stage: the planner plans PP=1)."""
    if recompute.granularity == "none":
        return 0
    return layers if recompute.method == "uniform" else min(recompute.num_layers, layers)


def encoder_arch(cfg) -> Arch:
    return arch_of(cfg.model.encoder_path) if parts.encoder(cfg.model.encoder).reads_protein else NO_ENCODER


def layouts(cfg, stage: str, gpus: int, device: Device, mfu: float = 0.4) -> List[Plan]:
    esm, llama = encoder_arch(cfg), arch_of(cfg.model.llama)
    out = []
    for tp in (1, 2, 4, 8):
        if tp > min(gpus, device.gpus_per_node) or gpus % tp:
            continue  # TP stays inside a node (NVLink); across nodes it would be bandwidth-bound
        if (esm is not NO_ENCODER and esm.heads % tp) or llama.kv_heads % tp or connector_split(cfg.model) % tp:
            continue
        if cfg.train.global_batch and cfg.train.global_batch % ((cfg.data.batch_size or 1) * (gpus // tp)):
            continue  # the trainer refuses it (see training/trainer.resolve_grad_accum)
        if (gpus // tp) % cfg.parallel.expert:
            continue  # experts split over data-parallel ranks (parallel/layout.check_layout)
        out.append(plan(cfg, stage, tp, gpus // tp, device, mfu))
    return out


def table(plans: List[Plan], stage: str, device_name: str, gpus: int, mfu: float) -> str:
    if not plans:
        return f"{gpus} x {device_name}, stage {stage}: no layout divides the GPUs, heads and global batch"
    rc = plans[0].recompute
    rows = [f"{gpus} x {device_name}, stage {stage}, MFU {mfu:.0%} assumed"
            + (f", recomputed: {rc}" if rc else ""), "",
            "| TP | PP | DP | EP | global batch | frozen w | trainable w | grads | optimizer | activations | overhead "
            "| total GiB/GPU | fits | step s | samples/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        m = {k: v / GIB for k, v in p.memory.items()}
        rows.append(f"| {p.tp} | {p.pp} | {p.dp} | {p.ep} | {p.global_batch} | {m['frozen_weights']:.2f} | "
                    f"{m['trainable_weights']:.3f} | {m['gradients']:.3f} | {m['optimizer']:.3f} | "
                    f"{m['activations']:.2f} | {m['overhead']:.1f} | {p.total / GIB:.2f} | "
                    f"{'yes' if p.fits else 'NO'} | {p.step_s:.3f} | {p.samples_s:.1f} |")
    return "\n".join(rows)


def run(cfg, gpus: int, device_name: str, stages: List[str], mfu: float = 0.4,
        as_json: bool = False, gpus_per_node: Optional[int] = None) -> str:
    if device_name not in DEVICES:
        raise PlanError(f"--gpu {device_name}: unknown; one of {sorted(DEVICES)}")
    device = DEVICES[device_name]
    if gpus_per_node:
        device = dataclasses.replace(device, gpus_per_node=gpus_per_node)
    out = []
    for stage in stages:
        ps = layouts(cfg, stage, gpus, device, mfu)
        if as_json:
            out.append(json.dumps([dict(dataclasses.asdict(p), total=p.total) for p in ps]))
        else:
            out.append(table(ps, stage, device_name, gpus, mfu) + recompute_hint(cfg, stage, gpus, device, mfu, ps))
    return "\n\n".join(out)


def recompute_hint(cfg, stage: str, gpus: int, device: Device, mfu: float, plans: List[Plan]) -> str:
    """A line under a table whose layouts do not all fit: what model.recompute (the decoder's and, where the step
    takes gradients through ESM, ESM's) makes of them. Empty where everything fits or it changes nothing."""
    over = [p for p in plans if not p.fits]
    rc = cfg.model.recompute
    changes = {"granularity": "full"} if rc.granularity == "none" else {}
    if not rc.encoder and esm_backward(cfg, stage):
        changes["encoder"] = True
    if not over or not changes:
        return ""
    full = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, recompute=dataclasses.replace(rc, **changes)))
    again = {p.tp: p for p in layouts(full, stage, gpus, device, mfu)}
    if not again or again[over[0].tp].recompute == over[0].recompute:
        return ""          # nothing to recompute in this step (H-SCALE's stage 1 with ESM frozen)
    label = again[over[0].tp].recompute
    keys = " ".join(f"model.recompute.{k}={str(v).lower()}" for k, v in changes.items()
                    if (k == "encoder" and "ESM" in label) or (k == "granularity" and "full" in label))
    sizes = [f"TP={p.tp} {again[p.tp].total / GIB:.1f} GiB{'' if again[p.tp].fits else ' (still too much)'}"
             for p in over]
    slower = again[over[0].tp].step_s / over[0].step_s
    return (f"\n\nNot fitting with every activation kept; with {keys}: {', '.join(sizes)}, for {slower:.2f}x the "
            f"step time at the same MFU.")
