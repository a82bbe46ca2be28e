"""Run under torchrun by test_model_parallel.py: build the model at a TP x PP layout, load the tiny HF
checkpoints, and compare losses, logits and gradients with the HF reference computed on every rank."""
import argparse
import json
import os

import torch
import torch.nn.functional as F


def reference_inputs(seed=3, micro=2, mb=2, seq=24, vocab=256, placeholder=250, slots=None):
    """Micro-batches of prompts with one placeholder per ESM token, or `slots` per protein (a resampler's)."""
    from megatron_p2t.data import esm_alphabet
    g = torch.Generator().manual_seed(seed)
    seqs = ["MKTAYIAKQRQISF", "MSSILPFTPPIVKRL", "MAADIFAK", "MHHHKLLQPW"]
    out = []
    for m in range(micro):
        ids = torch.randint(0, 200, (mb, seq), generator=g)
        lp = max(len(s) for s in seqs) + 2
        pids = torch.full((mb, lp), esm_alphabet.PAD)
        pmask = torch.zeros(mb, lp, dtype=torch.bool)
        for b in range(mb):
            e = torch.from_numpy(esm_alphabet.encode(seqs[(m * mb + b) % len(seqs)]))
            pids[b, :len(e)] = e
            pmask[b, :len(e)] = True
            ids[b, 2:2 + (slots or len(e))] = placeholder
        labels = torch.roll(ids, -1, 1)
        loss_mask = torch.zeros(mb, seq)
        loss_mask[:, 19:seq - 1] = 1
        out.append({"input_ids": ids, "position_ids": torch.arange(seq)[None].expand(mb, -1).contiguous(),
                    "protein_ids": pids, "protein_mask": pmask, "labels": labels, "loss_mask": loss_mask})
    return out


CHECKS = ["llama", "p2t", "p2t_resampler", "esm", "esm_lora", "llama_lora", "text", "resampler", "esm_structure"]
LATENTS = 6   # the tiny resampler's, tests/models/resampler_reference.py's Connector


def main():
    """Runs every --case WHAT:TP:PP in this one process group, one after another (megatron's model-parallel groups
    are rebuilt between cases): a launch costs more than most checks, so the test launches once per world size.
    Each case writes OUT/WHAT-tpTPppPP/rankN.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", required=True, metavar="WHAT:TP:PP")
    ap.add_argument("--sequences", help="file of real protein sequences, one per line (esm)")
    ap.add_argument("--ckpt")
    ap.add_argument("--sharded", help="p2t: take our weights from this megatron checkpoint (e.g. an import-p2tv2 "
                                      "of the same tiny parts) instead of the HF directories")
    ap.add_argument("--out")
    args = ap.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    for case in args.case:
        what, tp, pp = case.split(":")
        if what not in CHECKS:
            raise SystemExit(f"--case {case}: unknown check {what!r}; choose from {CHECKS}")
        a = argparse.Namespace(**{**vars(args), "what": what, "tp": int(tp), "pp": int(pp)})
        a.out = os.path.join(args.out, f"{what}-tp{tp}pp{pp}")
        os.makedirs(a.out, exist_ok=True)
        ps.destroy_model_parallel()
        a.layout = state.initialize(ParallelConfig(tensor=a.tp, pipeline=a.pp))
        run_case(a)
    state.destroy()


def run_case(a):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    from transformers import EsmModel, LlamaForCausalLM

    from megatron_p2t.checkpoint import llama_hf, p2t_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir, TensorSource
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.models import llama, p2t
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.models.projector import ProjectorConfig
    from megatron_p2t.parallel import pipeline

    tp_rank, pp_rank = a.layout.tp_rank, a.layout.pp_rank
    first, last = a.layout.first_stage, a.layout.last_stage
    llama_dir, esm_dir, proj_dir = (os.path.join(a.ckpt, n) for n in ("llama", "esm", "projector"))
    if a.what == "esm":
        return esm_check(a, esm_dir, tp_rank)
    if a.what == "llama_lora":
        return llama_lora_check(a, llama_dir, tp_rank)
    if a.what == "esm_lora":
        return esm_lora_check(a, esm_dir, tp_rank)
    if a.what == "text":
        return text_check(a, llama_dir, tp_rank)
    if a.what == "resampler":
        return resampler_check(a, llama_dir, tp_rank)
    if a.what == "esm_structure":
        return structure_check(a, esm_dir, tp_rank)
    hf_llama = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    resampled = a.what == "p2t_resampler"    # Protein2Text: ESM layer -2 -> resampler + mlp2x_gelu -> LLaMA
    batches = reference_inputs(slots=LATENTS if resampled else None)

    # -- the reference, in plain HF + torch, on every rank --
    ref_loss, ref_logits = [], []
    if a.what == "llama":
        ref_params = dict(hf_llama.named_parameters())
        for b in batches:
            logits = hf_llama(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            ref_logits.append(logits.detach())
            tok = F.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none")
            ref_loss.append((tok * b["loss_mask"]).sum() / b["loss_mask"].sum())
    else:
        from safetensors.torch import load_file
        hf_esm = EsmModel.from_pretrained(esm_dir, add_pooling_layer=False, attn_implementation="eager")
        if resampled:
            from tests.models.resampler_reference import Connector
            torch.manual_seed(11)
            conn = Connector(48, 64, latents=LATENTS)
            proj = dict(conn.named_parameters())
        else:
            proj = {k: v.clone().requires_grad_(True) for k, v in
                    load_file(os.path.join(proj_dir, "model.safetensors")).items()}
        ref_params = {**{f"llama.{k}": v for k, v in hf_llama.named_parameters()},
                      **{f"esm.{k}": v for k, v in hf_esm.named_parameters()},
                      **{f"proj.{k}": v for k, v in proj.items()}}
        for b in batches:
            out = hf_esm(input_ids=b["protein_ids"], attention_mask=b["protein_mask"].long(),
                         output_hidden_states=resampled)
            if resampled:   # the released code: one protein at a time, its residues only
                h = out.hidden_states[-2]
                h = torch.stack([conn(h[i, 1:int(n) - 1]) for i, n in enumerate(b["protein_mask"].sum(1))])
                h = h.flatten(0, 1)
            else:
                h = out.last_hidden_state
                h = F.gelu(F.linear(h, proj["fc1.weight"], proj["fc1.bias"]))
                h = F.normalize(F.gelu(F.linear(h, proj["fc2.weight"], proj["fc2.bias"])), dim=-1)
                h = h[b["protein_mask"]]
            emb = hf_llama.get_input_embeddings()(b["input_ids"])
            slots = (b["input_ids"] == 250).unsqueeze(-1).expand_as(emb)
            emb = emb.masked_scatter(slots, h)
            logits = hf_llama(inputs_embeds=emb, position_ids=b["position_ids"]).logits
            ref_logits.append(logits.detach())
            tok = F.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none")
            ref_loss.append((tok * b["loss_mask"]).sum() / b["loss_mask"].sum())
    (sum(ref_loss) / len(ref_loss)).backward()

    # -- ours at this layout --
    tp = a.tp
    if a.what == "llama":
        model = llama.build(hf_llama.config, pre_process=first, post_process=last, layout=a.layout)
        llama_hf.load_into(model, HFDir(llama_dir), hf_llama.config, tp_rank, tp)

        def expected_grads():
            g = TensorSource({k: v.grad for k, v in ref_params.items()}, "reference grads")
            return llama_hf.megatron_tensors(model, g, hf_llama.config, tp_rank, tp)
    else:
        from megatron_p2t.models.parts_config import ResamplerConfig
        pcfg = ProjectorConfig(input_dim=48, intermediate_dim=32, output_dim=64, dropout=0.0)
        ecfg = ESMConfig.from_hf(hf_esm.config)
        from megatron_p2t import parts
        from megatron_p2t.config import ModelConfig
        mcfg = ModelConfig(freeze=p2t.FreezeConfig(esm=False, connector=False, llm=False),
                           connector="resampler" if resampled else "mlp", esm_output_layer=-2 if resampled else -1,
                           resampler=ResamplerConfig(latents=LATENTS, depth=2, heads=4, head_dim=8))
        model = p2t.Prot2TextModel(mcfg, parts.of(mcfg), ecfg, hf_llama.config, pcfg, placeholder_id=250,
                                   pre_process=first, post_process=last, layout=a.layout)
        if a.sharded:
            from megatron_p2t.checkpoint import sharded
            sharded.load(model, a.sharded)
        else:
            conn_src = TensorSource(conn.released_state_dict()) if resampled else HFDir(proj_dir)
            copy_into(model, p2t_hf.megatron_tensors(model, HFDir(esm_dir), HFDir(llama_dir), conn_src,
                                                     hf_llama.config, pcfg, tp_rank, tp), "tiny checkpoints")

        def expected_grads():
            grads = {k: v.grad for k, v in ref_params.items()}
            # the connector's gradients under its source names: the released ones for the resampler
            rename = (lambda k: "model." + k) if resampled else (lambda k: k)
            pick = lambda pre, name=(lambda k: k): TensorSource({name(k[len(pre):]): v for k, v in grads.items()
                                                                 if k.startswith(pre)}, pre)
            return p2t_hf.megatron_tensors(model, pick("esm."), pick("llama."), pick("proj.", rename),
                                           hf_llama.config, pcfg, tp_rank, tp)

    outputs = pipeline.run(model, batches, collect_outputs=True)
    logit_diff = None
    if last:
        logit_diff = max(float((gather_from_tensor_model_parallel_region(o) - r).abs().max())
                         for o, r in zip(outputs, ref_logits))
    losses = pipeline.run(model, batches)
    loss_diff = [abs(float(l["loss"]) - float(r)) for l, r in zip(losses, ref_loss)] if last else None
    expected = expected_grads()
    grad_diff, checked = 0.0, 0
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None, name
            grad_diff = max(grad_diff, float((p.grad - expected[name]).abs().max()))
            checked += 1
    trainable = None
    if a.what in ("p2t", "p2t_resampler"):  # the stage-1 default: only the connector learns
        model.set_freeze(p2t.FreezeConfig())
        trainable = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
    rank = torch.distributed.get_rank()
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump({"tp_rank": tp_rank, "pp_rank": pp_rank, "logit_diff": logit_diff, "loss_diff": loss_diff,
                   "grad_diff": grad_diff, "grads_checked": checked, "trainable": trainable,
                   "params": sum(1 for _ in model.named_parameters())}, f)


def resampler_check(a, llama_dir, tp_rank):
    """Protein2Text's connector (models/resampler.py) loaded from the released names of the plain-torch reference
    (tests/models/resampler_reference.py): outputs, input and parameter gradients on a padded batch of proteins
    of three lengths against the reference run on each protein alone; and each row against ours run alone."""
    from transformers import LlamaConfig

    from megatron_p2t.checkpoint import resampler_hf
    from megatron_p2t.checkpoint.hf_dir import TensorSource
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.models import llama
    from megatron_p2t.models.parts_config import ResamplerConfig
    from megatron_p2t.models.resampler import ResamplerConnector
    from tests.models.resampler_reference import Connector
    torch.manual_seed(11)                                  # the same reference weights on every rank
    ref = Connector(48, 64, depth=2, head_dim=8, heads=4, latents=6, ff_mult=2)
    cfg = ResamplerConfig(latents=6, depth=2, heads=4, head_dim=8, ff_mult=2)
    ours = ResamplerConnector(cfg, 48, 64, llama.transformer_config(LlamaConfig.from_pretrained(llama_dir),
                                                                   layout=a.layout))
    copy_into(ours, resampler_hf.tensors(TensorSource(ref.released_state_dict()), ours, tp_rank, a.tp),
              "the reference connector")
    lens = [9, 3, 14]                                      # residues; ESM adds <cls> and <eos>
    g = torch.Generator().manual_seed(5)
    states = torch.randn(3, max(lens) + 2, 48, generator=g)
    mask = torch.zeros(3, max(lens) + 2, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, :n + 2] = True
    w = torch.randn(3, 6, 64, generator=g)
    x_ref, x_ours = states.clone().requires_grad_(True), states.clone().requires_grad_(True)
    out_ref = torch.stack([ref(x_ref[i, 1:n + 1]) for i, n in enumerate(lens)])
    (out_ref * w).sum().backward()
    out, out_mask = ours(x_ours, mask)
    (out * w).sum().backward()
    expected = resampler_hf.tensors(TensorSource({f"model.{k}": p.grad for k, p in ref.named_parameters()}),
                                    ours, tp_rank, a.tp)
    got = dict(ours.named_parameters())
    grad_diff = {k: float((got[k].grad - v).abs().max()) for k, v in expected.items()}
    with torch.no_grad():
        alone = max(float((ours(states[i:i + 1, :n + 2], mask[i:i + 1, :n + 2])[0][0] - out[i]).abs().max())
                    for i, n in enumerate(lens))
    # `mlp2x_gelu` on its own (one vector per ESM token), from the released mm_projector names
    from megatron_p2t.models.resampler import MLP2xGelu
    mlp = MLP2xGelu(48, 64, ours.config)
    copy_into(mlp, resampler_hf.tensors(TensorSource(ref.released_state_dict()), mlp, tp_rank, a.tp), "mm_projector")
    ref.zero_grad()
    x = states.clone()
    (ref.mm_projector(x) * states[..., :1]).sum().backward()
    y = mlp(x)
    (y * states[..., :1]).sum().backward()
    want = resampler_hf.tensors(TensorSource({f"model.{k}": p.grad for k, p in ref.named_parameters()
                                              if p.grad is not None}), mlp, tp_rank, a.tp)
    mlp_grad = max(float((p.grad - want[k]).abs().max()) for k, p in mlp.named_parameters())
    mlp_out = float((y - ref.mm_projector(x)).abs().max())
    # a run's checkpoint files (every rank's state dict) back to the released tensors, whole, as a later run at
    # another layout reads them; and the exported reader (hf_connector: plain torch, batched) on the same batch
    shards = [None] * a.tp
    torch.distributed.all_gather_object(shards, ours.state_dict())   # as saved: megatron's _extra_state Nones too
    whole, released = resampler_hf.whole(shards, ours), ref.released_state_dict()
    pos = "model.mm_resampler.media_pos_emb"               # of which the model reads row 0
    row = lambda k, t: t[0] if k == pos else t
    whole_diff = max(float((row(k, whole[k]) - row(k, released[k])).abs().max()) for k in released)
    from megatron_p2t.hf import connector as hf_connector
    reader = hf_connector.Connector("resampler", 48, 64, cfg)
    reader.load_state_dict({k[len("model."):]: v for k, v in whole.items()})
    with torch.no_grad():
        reader_out, reader_mask = reader(states, mask)
    with open(os.path.join(a.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"whole_names": sorted(whole) == sorted(released), "whole_diff": whole_diff,
                   "reader_diff": float((reader_out - out_ref).abs().max()), "reader_mask": bool(reader_mask.all()),
                   "tp_rank": tp_rank, "out_shape": list(out.shape), "mask_all_true": bool(out_mask.all()),
                   "out_diff": float((out - out_ref).abs().max()), "out_scale": float(out_ref.abs().max()),
                   "input_grad_diff": float((x_ours.grad - x_ref.grad).abs().max()),
                   "padding_grad": float(x_ours.grad[~mask].abs().max()), "alone_diff": alone,
                   "params": len(got), "grads_checked": len(grad_diff), "grad_diff": max(grad_diff.values()),
                   "worst_grad": max(grad_diff, key=grad_diff.get), "mlp2x_gelu_out_diff": mlp_out,
                   "mlp2x_gelu_grad_diff": mlp_grad, "mlp2x_gelu_params": len(want)}, f)


def esm_check(a, esm_dir, tp_rank):
    """ESM hidden states vs HF EsmModel on real sequences, padded, with one <mask> token."""
    from transformers import EsmModel

    from megatron_p2t.checkpoint import esm_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.data import esm_alphabet
    from megatron_p2t.models.esm import ESMConfig, ESMEncoder
    ids, mask = _esm_batch(open(a.sequences).read().split())
    ids[0, 4] = esm_alphabet.MASK
    hf = EsmModel.from_pretrained(esm_dir, add_pooling_layer=False, attn_implementation="eager").eval()
    ref = hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    diffs = {}
    for layer in (-1, -2):
        for unpad in (True, False):   # the real tokens back to back (the default), and the padded batch
            m = ESMEncoder(ESMConfig.from_hf(hf.config), output_layer=layer, layout=a.layout, unpad=unpad)
            esm_hf.load_into(m, HFDir(esm_dir), tp_rank, a.tp)
            out = m(ids, mask)
            diffs[f"{layer}, {'unpadded' if unpad else 'padded'}"] = float((out - ref[layer])[mask].abs().max())
    with open(os.path.join(a.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"tp_rank": tp_rank, "diffs": diffs, "tokens": int(mask.sum()), "padded": int((~mask).sum())}, f)


def esm_lora_check(a, esm_dir, tp_rank):
    """LoRA on ESM attention vs PEFT on HF EsmModel (same adapter values): output, every LoRA gradient, and the
    output after merging the adapter into the weights."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import EsmModel

    from megatron_p2t.checkpoint import esm_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir, TensorSource
    from megatron_p2t.checkpoint.llama_hf import load_lora
    from megatron_p2t.models.esm import ESMConfig, ESMEncoder
    from megatron_p2t.models.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
    seqs = open(a.sequences).read().split()[:4]  # the first 4 of esm_check's 6, as this check had on its own
    ids, mask = _esm_batch(seqs)
    hf = EsmModel.from_pretrained(esm_dir, add_pooling_layer=False, attn_implementation="eager")
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                         target_modules=["query", "key", "value", "attention.output.dense"]))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for n, mod in peft.named_modules():  # the fused QKV adapter shares A: give key/value the query's
            if n.endswith("attention.self"):
                for other in (mod.key, mod.value):
                    other.lora_A["default"].weight.copy_(mod.query.lora_A["default"].weight)
    w = torch.randn(*ids.shape, hf.config.hidden_size, generator=g)
    ref = peft(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    with torch.no_grad(), peft.disable_adapter():
        effect = float((peft(input_ids=ids, attention_mask=mask.long()).last_hidden_state - ref)[mask].abs().max())
    (ref * w)[mask].sum().backward()
    adapter = TensorSource({k: v.detach() for k, v in get_peft_model_state_dict(peft).items()}, "peft")
    grads = TensorSource({k.replace(".default", ""): p.grad for k, p in peft.named_parameters() if "lora_" in k})

    enc = ESMEncoder(ESMConfig.from_hf(hf.config), output_layer=-1, layout=a.layout)
    esm_hf.load_into(enc, HFDir(esm_dir), tp_rank, a.tp)
    apply_lora(enc, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["linear_qkv", "linear_proj"]))
    load_lora(enc, esm_hf.lora_tensors(enc, adapter, tp_rank, a.tp), "peft")
    trainable = sorted({n.rsplit(".", 1)[-1] for n, p in enc.named_parameters() if p.requires_grad})
    out = enc(ids, mask)
    (out * w)[mask].sum().backward()
    # the same mapping applied to PEFT's gradients
    want = esm_hf.lora_tensors(enc, grads, tp_rank, a.tp, require_shared_a=False)
    # our shared QKV A receives the sum of what PEFT's three separate (equal) A matrices receive
    for i, layer in enumerate(enc.block.layers):
        pre = f"base_model.model.encoder.layer.{layer.layer_number - 1}.attention.self."
        want[f"block.layers.{i}.self_attention.linear_qkv.lora_A"] = sum(
            grads.get(f"{pre}{x}.lora_A.weight") for x in ("query", "key", "value"))
    got = {f"{n}.{x}": getattr(m, x).grad for n, m in lora_layers(enc).items() for x in ("lora_A", "lora_B")}
    grad_diff = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
    with torch.no_grad():
        before = enc(ids, mask)
        merged = merge_lora(enc)
        after = enc(ids, mask)
    with open(os.path.join(a.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"tp_rank": tp_rank, "out_diff": float((out - ref)[mask].abs().max()), "grad_diff": grad_diff,
                   "grads": len(want), "trainable": trainable, "merged": merged,
                   "merge_diff": float((after - before)[mask].abs().max()), "lora_effect": effect}, f)


def llama_lora_check(a, llama_dir, tp_rank):
    """LoRA on every LLaMA linear vs PEFT on HF LlamaForCausalLM with the same adapter: masked loss, every LoRA
    gradient, the PEFT-layout export slices, and the output after merging."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from megatron_p2t.checkpoint import llama_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir, TensorSource
    from megatron_p2t.checkpoint.llama_hf import load_lora
    from megatron_p2t.models import llama
    from megatron_p2t.models.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
    hf = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for n, mod in peft.named_modules():  # fused adapters share A: q/k/v take q's, gate/up take gate's
            if n.endswith("self_attn"):
                for other in (mod.k_proj, mod.v_proj):
                    other.lora_A["default"].weight.copy_(mod.q_proj.lora_A["default"].weight)
            if n.endswith("mlp"):
                mod.up_proj.lora_A["default"].weight.copy_(mod.gate_proj.lora_A["default"].weight)
    b = reference_inputs(micro=1)[0]
    logits = peft(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    tok = F.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none")
    ref_loss = (tok * b["loss_mask"]).sum() / b["loss_mask"].sum()
    ref_loss.backward()
    adapter = TensorSource({k: v.detach() for k, v in get_peft_model_state_dict(peft).items()}, "peft")
    grads = TensorSource({k.replace(".default", ""): p.grad for k, p in peft.named_parameters() if "lora_" in k})

    names = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    model = llama.build(hf.config, layout=a.layout)
    llama_hf.load_into(model, HFDir(llama_dir), hf.config, tp_rank, a.tp)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=names))
    load_lora(model, llama_hf.lora_tensors(model, adapter, hf.config, tp_rank, a.tp, names), "peft")
    trainable = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})
    per_tok = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None,
                    labels=b["labels"])
    loss = (per_tok * b["loss_mask"]).sum() / b["loss_mask"].sum()
    loss.backward()
    want = llama_hf.lora_tensors(model, grads, hf.config, tp_rank, a.tp, names, require_shared_a=False)
    for i in range(len(model.decoder.layers)):  # a shared A receives the sum of PEFT's separate A gradients
        pre = f"base_model.model.model.layers.{i}."
        want[f"decoder.layers.{i}.self_attention.linear_qkv.lora_A"] = sum(
            grads.get(f"{pre}self_attn.{x}.lora_A.weight") for x in ("q_proj", "k_proj", "v_proj"))
        want[f"decoder.layers.{i}.mlp.linear_fc1.lora_A"] = sum(
            grads.get(f"{pre}mlp.{x}.lora_A.weight") for x in ("gate_proj", "up_proj"))
    got = {f"{n}.{x}": getattr(m, x).grad for n, m in lora_layers(model).items() for x in ("lora_A", "lora_B")}
    grad_diff = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
    slices = llama_hf.lora_hf_slices(model, hf.config, tp_rank, a.tp)
    export_diff = max(float((t - (adapter.get(n) if d is None else adapter.get(n, d, s0, s1))).abs().max())
                      for n, d, s0, s1, t in slices)
    with torch.no_grad():
        before = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None)
        merge_lora(model)
        after = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None)
    with open(os.path.join(a.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"tp_rank": tp_rank, "loss_diff": abs(float(loss) - float(ref_loss)), "grad_diff": grad_diff,
                   "grads": len(want), "trainable": trainable, "export_diff": export_diff,
                   "exported": sorted({n for n, *_ in slices}), "merge_diff": float((after - before).abs().max())}, f)


def random_fold(n, g):
    """C-alpha trace [n, 3]: a random walk of 3.8 A steps, turning at most ~60 degrees."""
    steps = [torch.randn(3, generator=g)]
    for _ in range(n - 1):
        v = steps[-1] + 1.2 * torch.randn(3, generator=g)
        steps.append(v)
    steps = torch.stack(steps)
    return torch.cumsum(3.8 * steps / steps.norm(dim=1, keepdim=True), 0)


def reference_bias(coords, known, w, heads):
    """The distance bias in plain torch: Gaussian kernels of C-alpha distances -> Linear -> GELU -> Linear (one value
    per head); the summed kernel features -> Linear -> x embed_scale; zero wherever a residue has no coordinates."""
    pair = (known[:, :, None] & known[:, None, :]).float()
    d = torch.cdist(coords, coords)
    std = w["stds"].abs() + 1e-5
    phi = torch.exp(-0.5 * ((d[..., None] - w["means"]) / std) ** 2) / ((2 * torch.pi) ** 0.5 * std)
    phi = phi * pair[..., None]
    h = F.gelu(phi @ w["fc1.weight"].T + w["fc1.bias"])
    bias = (h @ w["heads.weight"].T + w["heads.bias"]) * pair[..., None]
    extra = (phi.sum(2) @ w["embed.weight"].T + w["embed.bias"]) * w["scale"] * known[..., None].float()
    return bias.permute(0, 3, 1, 2), extra


def structure_check(a, esm_dir, tp_rank):
    """The structure-aware encoder (models/esm_structure.py) against HF's EsmModel fed the plain-torch distance bias
    as its additive attention mask and the feature term on its embeddings: outputs and every structure gradient,
    with rows chunked; without coordinates it must equal ESMEncoder bit for bit, alone and inside a mixed batch."""
    from transformers import EsmModel

    from megatron_p2t.checkpoint import esm_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.models.esm import ESMConfig, ESMEncoder
    from megatron_p2t.models.esm_structure import StructureESMEncoder
    from megatron_p2t.models.parts_config import StructureConfig
    seqs = open(a.sequences).read().split()[:3]
    ids, mask = _esm_batch(seqs)
    g = torch.Generator().manual_seed(5)
    coords = torch.zeros(*ids.shape, 3)
    known = torch.zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs[:2]):                    # the third protein has no structure
        coords[i, 1:len(s) + 1] = random_fold(len(s), g)
        known[i, 1:len(s) + 1] = True
    known[0, 5:9] = False                               # residues the structure does not cover
    coords = coords.requires_grad_(False)
    k, scfg = 16, StructureConfig(kernels=16, chunk=5, embed_scale=0.05)
    hf = EsmModel.from_pretrained(esm_dir, add_pooling_layer=False, attn_implementation="eager").eval()
    H, hidden = hf.config.num_attention_heads, hf.config.hidden_size
    w = {"means": torch.linspace(0, 20, k) + 0.1 * torch.randn(k, generator=g),
         "stds": 1.0 + torch.rand(k, generator=g), "fc1.weight": torch.randn(k, k, generator=g) * 0.3,
         "fc1.bias": torch.randn(k, generator=g) * 0.1, "heads.weight": torch.randn(H, k, generator=g) * 0.5,
         "heads.bias": torch.randn(H, generator=g) * 0.1, "embed.weight": torch.randn(hidden, k, generator=g) * 0.1,
         "embed.bias": torch.randn(hidden, generator=g) * 0.1}
    w = {n: t.clone().requires_grad_(True) for n, t in w.items()}
    w["scale"] = scfg.embed_scale
    bias, extra = reference_bias(coords, known & mask, w, H)
    emb = hf.embeddings(input_ids=ids, attention_mask=mask.long()) + extra
    additive = bias + (~mask)[:, None, None, :].float() * torch.finfo(torch.float32).min
    rope = hf.rotary_embeddings(emb, torch.arange(ids.shape[1])[None])
    ref = hf.encoder(emb, attention_mask=additive, position_embeddings=rope).last_hidden_state
    out_w = torch.randn(ref.shape, generator=g)
    (ref * out_w)[mask].sum().backward()

    enc = StructureESMEncoder(ESMConfig.from_hf(hf.config), scfg, output_layer=-1, layout=a.layout)
    plain = ESMEncoder(ESMConfig.from_hf(hf.config), output_layer=-1, layout=a.layout)
    padded = ESMEncoder(ESMConfig.from_hf(hf.config), output_layer=-1, layout=a.layout, unpad=False)
    esm_hf.load_into(plain, HFDir(esm_dir), tp_rank, a.tp)
    esm_hf.load_into(padded, HFDir(esm_dir), tp_rank, a.tp)
    esm_hf.load_into(enc, HFDir(esm_dir), tp_rank, a.tp, keep=("structure.",))
    h0, h1 = tp_rank * H // a.tp, (tp_rank + 1) * H // a.tp
    mine = {"means": w["means"], "stds": w["stds"], "linear_fc1.weight": w["fc1.weight"],
            "linear_fc1.bias": w["fc1.bias"], "linear_heads.weight": w["heads.weight"][h0:h1],
            "linear_heads.bias": w["heads.bias"][h0:h1], "linear_embed.weight": w["embed.weight"],
            "linear_embed.bias": w["embed.bias"]}
    with torch.no_grad():
        for n, p in enc.structure.named_parameters():
            p.copy_(mine[n])
    for p in enc.parameters():
        p.requires_grad_(True)
    out = enc(ids, mask, coords, known)
    (out * out_w)[mask].sum().backward()
    want = {n: w[_REF[n]].grad[h0:h1] if "heads" in n else w[_REF[n]].grad for n, _ in enc.structure.named_parameters()}
    # relative to each gradient's own size: the kernel centres' and widths' sum over every pair and reach ~1e2
    grads = {n: float((p.grad - want[n]).abs().max() / max(1.0, float(want[n].abs().max())))
             for n, p in enc.structure.named_parameters()}
    with torch.no_grad():
        my_bias, _ = enc.structure(coords, known & mask)
        base, base_padded = plain(ids, mask), padded(ids, mask)
        no_coords = enc(ids, mask)
        none_known = enc(ids, mask, coords, torch.zeros_like(known))
        mixed = enc(ids, mask, coords, known)
    res = {"tp_rank": tp_rank, "out_diff": float((out - ref)[mask].abs().max()),
           "bias_diff": float((my_bias - bias[:, h0:h1]).abs().max()), "bias_scale": float(bias.abs().max()),
           "structure_effect": float((mixed - base_padded)[:2][mask[:2]].abs().max()),
           "grad_diff": max(grads.values()), "grads": len(grads),
           "grad_scale": min(float(p.grad.abs().max()) for p in enc.structure.parameters()),
           "no_coords_equal": bool(torch.equal(no_coords, base)), "none_known_equal": bool(torch.equal(none_known, base)),
           "mixed_row_equal": bool(torch.equal(mixed[2], base_padded[2])),   # a batch with coordinates runs padded
           "unpadded_diff": float((base - base_padded)[mask].abs().max()),
           "unpadded_zero_at_padding": bool((base[~mask] == 0).all())}
    with open(os.path.join(a.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(res, f)


_REF = {"means": "means", "stds": "stds", "linear_fc1.weight": "fc1.weight", "linear_fc1.bias": "fc1.bias",
        "linear_heads.weight": "heads.weight", "linear_heads.bias": "heads.bias",
        "linear_embed.weight": "embed.weight", "linear_embed.bias": "embed.bias"}


def _esm_batch(seqs):
    from megatron_p2t.data import esm_alphabet
    enc = [torch.from_numpy(esm_alphabet.encode(s)) for s in seqs]
    ids = torch.full((len(enc), max(map(len, enc))), esm_alphabet.PAD)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
        mask[i, :len(e)] = True
    return ids, mask


def text_check(a, llama_dir, tp_rank):
    """Pooled layer-k text states vs HF LlamaForCausalLM's hidden_states[k], padded batch."""
    from transformers import LlamaForCausalLM

    from megatron_p2t.checkpoint import llama_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.models.pooling import masked_mean_std
    from megatron_p2t.models.text_side import TextPooler
    hf = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 250, (3, 20), generator=g)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for i, n in enumerate((20, 13, 7)):
        mask[i, :n] = True
    diffs = {}
    for k in (1, 2, 3):
        m = TextPooler(hf.config, layer=k, layout=a.layout)
        copy_into(m.llm, llama_hf.megatron_tensors(m.llm, HFDir(llama_dir), hf.config, tp_rank, a.tp), "")
        # right padding with a causal mask: real tokens never attend to the padding after them
        ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[k]
        rm, rs = masked_mean_std(ref, mask)
        for unpad in (True, False):     # the texts back to back (the default), and the padded batch
            m.unpad = unpad
            mean, std = m(ids, mask)
            diffs[f"{k}, {'unpadded' if unpad else 'padded'}"] = max(float((mean - rm).abs().max()),
                                                                     float((std - rs).abs().max()))
        assert len(m.llm.decoder.layers) == k and not any(p.requires_grad for p in m.parameters())
    with open(os.path.join(a.out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        try:
            TextPooler(hf.config, layer=4, layout=a.layout)
            refused = False
        except ValueError:
            refused = True
        json.dump({"tp_rank": tp_rank, "diffs": diffs, "last_layer_refused": refused}, f)


if __name__ == "__main__":
    main()
