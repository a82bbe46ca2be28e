"""Run by test_align_parallel.py: the stage-1 model at DP=2 (gathered negatives) and TP=2 against one process
on the concatenated batch."""
import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--work")
    ap.add_argument("--cache", action="store_true", help="read the text side from `cache-text` vectors")
    ap.add_argument("--lora", action="store_true", help="LoRA on ESM's attention too (its gradients compared), "
                    "this layout's step with ESM recomputed (model.recompute.encoder) against one process keeping it")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from megatron_p2t.config import load_config
    from megatron_p2t.data.loader import ProteinTextLoader
    from megatron_p2t.parallel import state
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "align_tiny_cpu.yaml"),
                      a.overrides + [f"parallel.tensor={a.tp}", f"align.use_text_cache={str(a.cache).lower()}"]
                      + (["model.esm_lora.r=4", "model.esm_lora.dropout=0.0", "model.recompute.encoder=true"]
                         if a.lora else []))
    from megatron_p2t.training.stages.align_hscale import use_cache_if_asked
    cfg = use_cache_if_asked(cfg)
    layout = state.initialize(cfg.parallel)

    from megatron_p2t.checkpoint.slicing import span as _span
    from megatron_p2t.training.align import align_loss
    from megatron_p2t.training.stages.align_hscale import build
    model = build(cfg, layout)
    if a.lora:  # B starts at zero, which would leave A without gradient: move it off zero, equally on every rank
        from megatron_p2t.models.lora import lora_layers
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for m in lora_layers(model.esm).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    full = next(iter(ProteinTextLoader(cfg.data, dp_rank=0, dp_size=1)))   # the same 8 samples on every rank
    dp, dpr = layout.dp, layout.dp_rank
    n = full["protein_ids"].shape[0] // dp
    mine = {k: (v[dpr * n:(dpr + 1) * n] if torch.is_tensor(v) else v[dpr * n:(dpr + 1) * n]) for k, v in full.items()}
    tpr, tp = layout.tp_rank, a.tp
    i0, i1 = _span(cfg.model.projector.intermediate_dim, tpr, tp, "")
    out = {}
    for variant in ("paper", "concat"):
        model.align_cfg.variant = variant
        grads = lambda: {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        # one process, the whole batch, negatives from that batch only
        model.align_cfg.gather_negatives = False
        model.esm.recompute = False
        model.zero_grad(set_to_none=True)
        ref_loss, _ = align_loss(model, full, model.align_cfg)
        ref_loss.backward()
        ref = grads()
        # this layout: this rank's rows, negatives gathered over the data-parallel group
        model.align_cfg.gather_negatives = True
        model.esm.recompute = cfg.model.recompute.encoder
        checkpointed = []
        if a.lora:
            from megatron.core import tensor_parallel
            real = tensor_parallel.checkpoint
            tensor_parallel.checkpoint = lambda *args: (checkpointed.append(1), real(*args))[1]
        model.zero_grad(set_to_none=True)
        loss, _ = align_loss(model, mine, model.align_cfg, layout.dp_group)
        loss.backward()
        got = grads()
        if a.lora:
            tensor_parallel.checkpoint = real
        total = loss.detach().clone()
        dist.all_reduce(total, group=layout.dp_group)
        for g in got.values():   # DeepSpeed's gradient averaging over data-parallel ranks
            dist.all_reduce(g, group=layout.dp_group)
            g /= dp
        res = {"loss_diff": abs(float(total) / dp - float(ref_loss)),
               "grad_diff": max(float((got[k] - ref[k]).abs().max()) for k in got if k.startswith("connector.")),
               "loss": float(ref_loss)}
        saved = os.path.join(a.work, f"tp1_{variant}.pt")
        if tp == 1 and not a.cache and not a.lora and dist.get_rank() == 0:
            torch.save({"loss": float(ref_loss), "grads": ref}, saved)
        dist.barrier()
        if a.lora:
            lora = [k for k in got if ".lora_" in k]
            res["lora_grads"] = len(lora)
            res["esm_layers_recomputed"] = len(checkpointed)
            res["lora_grad_rel_diff"] = max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in lora)
        elif tp > 1 or a.cache:  # against the TP=1 run without cache, sliced like this rank's shards
            t1 = torch.load(saved)
            t1 = {k.replace("connector.", ""): v for k, v in t1["grads"].items()}
            want = {"fc1.weight": t1["fc1.weight"][i0:i1], "fc1.bias": t1["fc1.bias"][i0:i1],
                    "fc2.weight": t1["fc2.weight"][:, i0:i1], "fc2.bias": t1["fc2.bias"]}
            want = {"connector." + k: v for k, v in want.items()}
            res["vs_tp1_loss"] = abs(float(total) / dp - torch.load(saved)["loss"])
            res["vs_tp1_grad"] = max(float((got[k] - want[k]).abs().max()) for k in want)
        out[variant] = res
    if a.cache:
        assert model.text is None, "with the cache, no decoder layer is built"
    with open(os.path.join(a.work, f"tp{tp}{'_cache' if a.cache else ''}{'_lora' if a.lora else ''}_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    state.destroy()


if __name__ == "__main__":
    main()
