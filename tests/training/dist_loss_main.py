"""Run by test_loss.py under torchrun: DP ranks with the gathered loss vs one process on the whole batch."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_p2t.models.align import learnable_temperature, temperature_of
from megatron_p2t.models.pooling import masked_mean_std
from megatron_p2t.training.loss import hscale_loss


def make(seed=0, n=8, length=12, d_in=16, d=64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, d_in, generator=g)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        mask[i, : 3 + (i * 5) % (length - 3)] = True
    text_mean, text_std = torch.randn(n, d, generator=g), torch.rand(n, d, generator=g) + 0.1
    proj = torch.nn.Linear(d_in, d)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(d, d_in, generator=g) * 0.3)
        proj.bias.copy_(torch.randn(d, generator=g) * 0.1)
    return tokens, mask, text_mean, text_std, proj


def step(tokens, mask, tm, ts, proj, temp_param, variant, symmetric, group=None):
    mean, std = masked_mean_std(proj(tokens), mask)
    loss = hscale_loss(mean, std, tm, ts, temperature_of(temp_param, 0.05), group=group, symmetric=symmetric,
                       variant=variant)
    loss.backward()
    return loss


def main():
    out = sys.argv[1]
    results = {}
    cases = [(v, s) for v in ("paper", "concat") for s in (False, True)]
    refs = {}
    for v, s in cases:  # one process, the whole batch, before any process group exists
        tokens, mask, tm, ts, proj = make()
        temp = learnable_temperature(0.05)
        loss = step(tokens, mask, tm, ts, proj, temp, v, s)
        refs[(v, s)] = (float(loss), proj.weight.grad.clone(), float(temp.grad))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for v, s in cases:
        tokens, mask, tm, ts, proj = make()
        n = tokens.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        temp = learnable_temperature(0.05)
        loss = step(tokens[sl], mask[sl], tm[sl], ts[sl], proj, temp, v, s)
        for t in (proj.weight.grad, temp.grad):  # what DeepSpeed does to gradients over the DP group
            dist.all_reduce(t)
            t /= world
        total = loss.detach().clone()
        dist.all_reduce(total)
        ref_loss, ref_grad, ref_tgrad = refs[(v, s)]
        results[f"{v}-{'sym' if s else 'p2t'}"] = {
            "loss_diff": abs(float(total) / world - ref_loss), "grad_diff": float((proj.weight.grad - ref_grad).abs().max()),
            "temp_grad_diff": abs(float(temp.grad) - ref_tgrad), "loss": ref_loss}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
