"""Run under torchrun (4 processes) by test_moe.py: the mixture-of-experts decoder at several tensor x pipeline x
expert layouts against one process's computation of the same micro-batches.

The first case (TP=PP=EP=1) computes the reference on every rank alone: all micro-batches of all data-parallel
ranks, losses, gradients (Switch loss included) and router counts. Every later case spreads the same micro-batches
over its data-parallel ranks, reduces gradients as training does (dense ones averaged over the data-parallel
group, experts' summed over the expert-data-parallel group and divided by the data-parallel size, as
megatron-core's DDP does) and compares this rank's slice with the reference's, mapped through the checkpoint
adapter (which also decides which experts this rank holds). Under expert parallelism the trainer's expert optimizer
(training/experts.py, state partitioned over the expert-data-parallel group) then steps this rank's unreduced
expert gradients, and its norm, new weights and saved checkpoint are compared with one AdamW step the reference
took on the whole gradients (adam_eps large, so the update is near-linear in the gradient and a wrongly reduced or
clipped gradient shows). Each case writes OUT/<case>/rankN.json."""
import argparse
import json
import os

import torch

MICRO = 8          # micro-batches over all data-parallel ranks
MB, SEQ = 2, 16    # tokens per micro-batch: capacity (1.25 x an even share) is per micro-batch, as per forward
ADAM = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1.0, "weight_decay": 0.01}


def expert_step_reference(weights, grads):
    """One clipped AdamW step on the experts (HF names) from the whole-batch gradients: (norm, new tensors)."""
    names = [n for n in grads if ".mlp.experts." in n]
    norm = sum(float((grads[n].double() ** 2).sum()) for n in names) ** 0.5
    new = {n: torch.nn.Parameter(weights[n].clone()) for n in names}
    clip = norm / 2                         # so that clipping bites
    for n in names:
        new[n].grad = grads[n] * (clip / (norm + 1e-6))
    opt = torch.optim.AdamW(list(new.values()), **ADAM)
    opt.step()
    return norm, {**weights, **{n: p.detach() for n, p in new.items()}}


def batches(vocab):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(MICRO):
        ids = torch.randint(0, vocab, (MB, SEQ), generator=g)
        out.append({"input_ids": ids, "position_ids": torch.arange(SEQ)[None].expand(MB, -1).contiguous(),
                    "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(MB, SEQ)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", required=True, metavar="TP:PP:EP")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reshard", help="a directory: the first parallel case writes a megatron distributed "
                                      "checkpoint there, every later one reads it at its own layout")
    a = ap.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    ref = None
    for case in a.case:
        tp, pp, ep = (int(x) for x in case.split(":"))
        ps.destroy_model_parallel()
        layout = state.initialize(ParallelConfig(tensor=tp, pipeline=pp, expert=ep))
        res = run_case(a.ckpt, layout, ref, a.reshard)
        if ref is None:
            ref = res
            res = {k: v for k, v in res.items() if k in ("losses", "stats")}
        out = os.path.join(a.out, f"tp{tp}pp{pp}ep{ep}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump(res, f)
    state.destroy()


def run_case(ckpt, layout, ref, reshard=None):
    from transformers import AutoConfig

    from megatron_p2t.checkpoint import llama_moe_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir, TensorSource
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.models import llama, llama_moe
    from megatron_p2t.models.parts_config import MoEConfig
    from megatron_p2t.parallel import pipeline
    from megatron_p2t.parallel.state import collective_device

    hf_cfg = AutoConfig.from_pretrained(ckpt)
    moe = MoEConfig(experts=hf_cfg.num_experts, top_k=hf_cfg.num_experts_per_tok)
    model = llama.build(hf_cfg, pre_process=layout.first_stage, post_process=layout.last_stage, layout=layout,
                        moe=moe)
    copy_into(model, llama_moe_hf.megatron_tensors(model, HFDir(ckpt), hf_cfg, moe, layout.tp_rank, layout.tp),
              ckpt)
    resharded = None
    if reshard and ref is not None:
        from megatron_p2t.checkpoint import sharded
        if not os.path.exists(os.path.join(reshard, "metadata.json")):
            sharded.save(model, reshard)
        else:
            other = llama.build(hf_cfg, pre_process=layout.first_stage, post_process=layout.last_stage,
                                layout=layout, moe=moe)
            sharded.load(other, reshard)
            mine, theirs = model.state_dict(), other.state_dict()
            resharded = all(torch.equal(mine[k], theirs[k]) for k in mine if "_extra_state" not in k)
    model.train()
    data = batches(hf_cfg.vocab_size)
    if ref is None:                      # the reference: every micro-batch in this one process
        assert layout.tp == layout.pp == layout.ep == 1
        out = pipeline.run(model, data)
        stats = llama_moe.take_router_stats(model, dataclass_one(layout))
        weights = {s.name: s.tensor.clone() for s in llama_moe_hf.hf_slices(model, hf_cfg, 0, 1, 0)}
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.grad)
        grads = {s.name: s.tensor.clone() for s in llama_moe_hf.hf_slices(model, hf_cfg, 0, 1, 0)}
        norm, stepped = expert_step_reference(weights, grads)
        return {"losses": [float(o["loss"]) for o in out], "stats": stats, "grads": grads, "expert_norm": norm,
                "stepped": stepped}
    per_rank = MICRO // layout.dp
    mine = data[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    out = pipeline.run(model, mine)
    stats = llama_moe.take_router_stats(model, layout)
    opt_res = expert_optimizer_case(model, layout, ref, hf_cfg, moe) if layout.ep > 1 else None
    dev = collective_device()
    for p in model.parameters():
        g = p.grad.to(dev)
        group = layout.expert_dp_group if llama_moe.is_expert_param(p) else layout.dp_group
        torch.distributed.all_reduce(g, group=group)
        p.grad.copy_(g.cpu() / layout.dp)
    expected = llama_moe_hf.megatron_tensors(model, TensorSource(ref["grads"], "reference gradients"), hf_cfg, moe,
                                             layout.tp_rank, layout.tp)
    worst, rel, checked = 0.0, 0.0, 0
    for name, p in model.named_parameters():
        e = expected[name]
        worst = max(worst, float((p.grad - e).abs().max()))
        rel = max(rel, float((p.grad - e).norm() / e.norm().clamp(min=1e-12)))
        checked += 1
    losses = [float(o["loss"]) for o in out]
    ref_losses = ref["losses"][layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    stat_diff = max((abs(v - ref["stats"][k]) for k, v in stats.items()), default=0.0)
    return {"loss_diff": max(abs(x - y) for x, y in zip(losses, ref_losses)) if layout.last_stage else None,
            "grad_diff": worst, "grad_rel": rel, "checked": checked,
            "params": sum(1 for _ in model.parameters()), "stat_keys": sorted(stats), "stat_diff": stat_diff,
            "local_experts": len(llama_moe.moe_layers(model)[0].experts.local_experts), "ep_rank": layout.ep_rank,
            "tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank, "dp": layout.dp, "resharded": resharded,
            "optimizer": opt_res}


def expert_optimizer_case(model, layout, ref, hf_cfg, moe):
    """The trainer's expert optimizer on this rank's own (unreduced) expert gradients, against the reference's
    step; the model's gradients are left as they were, for the gradient check after it."""
    import shutil
    import tempfile
    import types

    import torch.distributed as dist

    from megatron_p2t.checkpoint import llama_moe_hf
    from megatron_p2t.checkpoint.hf_dir import TensorSource
    from megatron_p2t.models import llama_moe
    from megatron_p2t.training import experts
    named = [(n, p) for n, p in model.named_parameters() if llama_moe.is_expert_param(p)]
    kept = {n: p.grad.clone() for n, p in named}
    before = {n: p.detach().clone() for n, p in named}
    tc = types.SimpleNamespace(clip_grad=ref["expert_norm"] / 2, lr=ADAM["lr"], adam_betas=ADAM["betas"],
                               adam_eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    opt = experts.ExpertOptimizer(named, tc, layout, lambda step: 1.0)
    opt.reduce()             # no DeepSpeed step beside it here: clipped by the experts' own norm
    opt.apply()
    expected = llama_moe_hf.megatron_tensors(model, TensorSource(ref["stepped"], "reference step"), hf_cfg, moe,
                                             layout.tp_rank, layout.tp)
    step_diff = max(float((p.detach() - expected[n]).abs().max()) for n, p in named)
    update = max(float((expected[n] - before[n]).abs().max()) for n, _ in named)
    # the checkpoint: gathered from the owners into one file per (expert-parallel, model-parallel) rank, and read
    # back by a fresh optimizer whose weights were moved away
    d = [tempfile.mkdtemp(prefix="experts_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(d, src=0)
    opt.save_weights(d[0])
    dist.barrier()
    with torch.no_grad():
        for _, p in named:
            p.add_(1.0)
    again = experts.ExpertOptimizer(named, tc, layout, lambda step: 1.0)
    again.load_weights(d[0])
    reloaded = max(float((p.detach() - expected[n]).abs().max()) for n, p in named)
    masters = max((float((m.detach() - expected[n]).abs().max()) for n, m in zip(again.names, again.master)
                   if m is not None), default=0.0)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(d[0])
    owned = [None] * dist.get_world_size()
    dist.all_gather_object(owned, (layout.ep_rank, layout.mp_rank, opt.owned_names()))
    mine = [names for ep, mp, names in owned if (ep, mp) == (layout.ep_rank, layout.mp_rank)]
    partitioned = sorted(n for names in mine for n in names) == sorted(opt.names) and \
        all(len(names) < len(opt.names) for names in mine) if len(mine) > 1 else mine[0] == opt.names
    for n, p in named:
        p.grad = kept[n]
    return {"norm_rel": abs(opt.last_norm - ref["expert_norm"]) / ref["expert_norm"], "step_diff": step_diff,
            "update": update, "reloaded_diff": reloaded, "masters_diff": masters, "expert_dp": opt.expert_dp,
            "partitioned": partitioned, "tensors": len(named)}


def dataclass_one(layout):
    """The reference's counts stay local (each rank computed all micro-batches alone)."""
    import dataclasses
    return dataclasses.replace(layout, dp=1)


if __name__ == "__main__":
    main()
