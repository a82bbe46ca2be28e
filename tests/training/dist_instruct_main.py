"""Run by test_instruct.py: the stage-2 model on real sample batches, packed against padded, and TP=2 against
TP=1 (loss, projector and LoRA gradients)."""
import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--work")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from megatron_p2t.checkpoint import llama_hf
    from megatron_p2t.checkpoint.hf_dir import TensorSource
    from megatron_p2t.config import load_config
    from megatron_p2t.data.loader import ProteinTextLoader
    from megatron_p2t.models.lora import lora_layers
    from megatron_p2t.parallel import state
    from megatron_p2t.training import joined
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "instruct_tiny_cpu.yaml"),
                      a.overrides + [f"parallel.tensor={a.tp}", "model.llm_lora.dropout=0.0"])
    layout = state.initialize(cfg.parallel)
    model, llama_cfg, _, _ = joined.build(cfg, layout)
    with torch.no_grad():  # B starts at zero; move it off zero, identically at every layout, so A has gradients
        g = torch.Generator().manual_seed(5)
        for name, m in sorted(lora_layers(model.llm).items()):
            full = torch.randn(m.lora_B.shape[0] * (a.tp if m.kind == "column" else 1), m.lora_B.shape[1],
                               generator=g) * 0.05
            if m.kind == "column":  # this rank's rows, in megatron's layout, from one layout-free draw
                full = _column_rows(name, full, llama_cfg, layout.tp_rank, a.tp)
            m.lora_B.copy_(full)
    ld = joined.make_loader(cfg, layout)
    raw = next(iter(ProteinTextLoader(cfg.data, dp_rank=0, dp_size=1)))
    res = {}
    for pack in (False, True):
        ld.cfg.pack = pack
        batch = ld.convert(raw)
        model.zero_grad(set_to_none=True)
        loss, n = joined.forward_loss(model, batch)
        loss.backward()
        res[pack] = {"loss": float(loss), "rows": int(batch["input_ids"].shape[0]), "tokens": int(n),
                     "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}}
    out = {"loss_diff": abs(res[True]["loss"] - res[False]["loss"]), "loss": res[False]["loss"],
           "rows": [res[False]["rows"], res[True]["rows"]], "tokens": res[True]["tokens"],
           "grad_diff": max(float((res[True]["grads"][k] - g).abs().max() / g.abs().max().clamp(min=1e-12))
                            for k, g in res[False]["grads"].items()),
           "trainable": sorted({k.split(".")[0] if "lora_" not in k else "lora" for k in res[False]["grads"]})}
    # in HF layout, so TP=1 and TP=2 compare whatever the sharding
    grads = res[False]["grads"]
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in grads:
                p.copy_(grads[k])
    tpr = layout.tp_rank
    conn = model.connector_spec.adapter.slices(model.connector, tpr, a.tp)   # in the connector's HF names
    # (HF name, split dim, start, stop, tensor); one HF tensor may come in several slices (the resampler's to_kv)
    slices = list(llama_hf.lora_hf_slices(model.llm, llama_cfg, tpr, a.tp)) + [("proj." + n, *r) for n, *r in conn]
    ref_path = os.path.join(a.work, "tp1_grads.pt")
    if a.tp == 1:
        whole = {}
        for n, d, s0, s1, t in sorted(slices, key=lambda x: (x[0], x[2])):
            whole[n] = t if d is None or n not in whole else torch.cat([whole[n], t], d)
        torch.save({"loss": res[False]["loss"], "grads": whole}, ref_path)
    else:
        ref = torch.load(ref_path)
        src = TensorSource(ref["grads"])
        diffs = []
        for n, d, s0, s1, t in slices:
            want = src.get(n) if d is None else src.get(n, d, s0, s1)
            diffs.append(float((t - want).abs().max() / want.abs().max().clamp(min=1e-12)))
        out.update(vs_tp1_loss=abs(res[False]["loss"] - ref["loss"]), vs_tp1_grad=max(diffs), compared=len(diffs))
    with open(os.path.join(a.work, f"tp{a.tp}_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    state.destroy()


def _column_rows(name, full, hf_cfg, tpr, tp):
    """This rank's rows of a column-parallel B drawn whole in HF order (q/k/v or gate/up stacked)."""
    from megatron_p2t.checkpoint.llama_hf import fuse_qkv
    from megatron_p2t.checkpoint.slicing import span as _span
    hd = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    qpg = hf_cfg.num_attention_heads // hf_cfg.num_key_value_heads
    if name.endswith("linear_qkv"):
        nq, nk = hf_cfg.num_attention_heads * hd, hf_cfg.num_key_value_heads * hd
        q, k, v = full[:nq], full[nq:nq + nk], full[nq + nk:]
        g0, g1 = _span(hf_cfg.num_key_value_heads, tpr, tp, "")
        return fuse_qkv(q[g0 * qpg * hd:g1 * qpg * hd], k[g0 * hd:g1 * hd], v[g0 * hd:g1 * hd], qpg, hd)
    f = hf_cfg.intermediate_size
    f0, f1 = _span(f, tpr, tp, "")
    return torch.cat([full[:f][f0:f1], full[f:][f0:f1]])


if __name__ == "__main__":
    main()
