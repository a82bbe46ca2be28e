"""Experts under expert parallelism (parallel.expert > 1), trained beside DeepSpeed's engine.

DeepSpeed's ZeRO partitions, reduces and broadcasts every parameter it is given over the data-parallel group,
which is right for everything but experts: with expert parallelism, data-parallel ranks hold *different* experts
(megatron-core marks them `allreduce=False`). DeepSpeed's own MoE support expects its own MoE layer class (it
looks for `deepspeed.moe.layer.MoE` to switch it on, and writes expert checkpoints by that class's names), so
megatron-core's experts are kept out of the engine's optimizer and stepped here, the way megatron-core's
distributed optimizer treats them:
- gradients summed over the expert-data-parallel group (the ranks holding the same experts) and divided by the
  data-parallel size, so every expert gets the mean over all data-parallel ranks' tokens, as a dense parameter;
- clipped by their own global norm (over every expert of every rank) at train.clip_grad; DeepSpeed clips the
  other parameters by theirs. (Megatron-LM clips all parameters by one norm; DeepSpeed computes its norm inside
  its step, so the two cannot be joined without reaching into ZeRO.)
- AdamW with the run's hyperparameters and learning-rate schedule, on fp32 master copies;
- checkpoints: the fp32 weights per (expert-parallel rank, model-parallel rank) next to DeepSpeed's files
  (`experts_epEE_mpMM.pt`, which export reads), optimizer state in each rank's own extra file.
DeepSpeed still broadcasts every parameter of the module at start-up; the experts' go over the expert-data-
parallel group, which `register_groups` names to it under its own convention (`ep_size_N`).
"""
from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist

from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device


def group_name(layout: Layout) -> str:
    return f"ep_size_{layout.ep}"


def register_groups(layout: Layout, params: List[torch.nn.Parameter]) -> None:
    """Name megatron-core's expert groups to DeepSpeed (deepspeed.utils.groups) and tag the expert parameters
    with that name, so the engine's start-up broadcast keeps each expert within the ranks that hold it."""
    from deepspeed.utils import groups
    name = group_name(layout)
    groups._EXPERT_PARALLEL_GROUP[name] = layout.ep_group
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = layout.expert_dp_group
    for p in params:
        p.group_name = name


class ExpertOptimizer:
    """AdamW over fp32 master copies of the experts (the weights themselves may be bf16, as DeepSpeed's bf16
    optimizer keeps its own masters), reduced and clipped as the module docstring says, one parameter at a time
    (no flat copy of every expert's gradient)."""

    def __init__(self, named_params, tc, layout: Layout, lr_lambda):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.layout, self.clip = layout, tc.clip_grad
        self.opt = torch.optim.AdamW(self.master, lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps,
                                     weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.expert_dp = dist.get_world_size(group=layout.expert_dp_group)
        self.last_norm = None

    def step(self) -> None:
        """Reduce, clip and apply the accumulated gradients, then clear them (every rank, every step)."""
        dev = collective_device()
        sq = torch.zeros(1, dtype=torch.float64, device=dev)
        for p, m in zip(self.params, self.master):
            g = (p.grad if p.grad is not None else torch.zeros_like(p)).to(dev, torch.float32)
            if self.expert_dp > 1:
                dist.all_reduce(g, group=self.layout.expert_dp_group)
            g /= self.layout.dp
            sq += (g.double() ** 2).sum()
            m.grad = g.to(m.device)
            p.grad = None
        # each expert shard is held by expert_dp ranks alike: sum squares over the world, count each once
        dist.all_reduce(sq)
        norm = float(sq / self.expert_dp) ** 0.5
        self.last_norm = norm
        if self.clip and norm > self.clip:
            for m in self.master:
                m.grad.mul_(self.clip / (norm + 1e-6))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])

    def save_weights(self, directory: str) -> None:
        """The first of the ranks holding these experts writes their fp32 masters."""
        if dist.get_rank(group=self.layout.expert_dp_group) == 0:
            torch.save({n: m.detach().cpu() for n, m in zip(self.names, self.master)},
                       os.path.join(directory, weights_name(self.layout.ep_rank, self.layout.mp_rank)))

    @torch.no_grad()
    def load_weights(self, directory: str) -> None:
        load_weights(dict(zip(self.names, self.master)), directory, self.layout)
        for p, m in zip(self.params, self.master):
            p.copy_(m)


def weights_name(ep_rank: int, mp_rank: int) -> str:
    return f"experts_ep{ep_rank:02d}_mp{mp_rank:02d}.pt"


@torch.no_grad()
def load_weights(params: dict, directory: str, layout: Layout) -> None:
    """A run's experts for this (expert-parallel, model-parallel) rank into `params` (name -> parameter)."""
    path = os.path.join(directory, weights_name(layout.ep_rank, layout.mp_rank))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; a run with parallel.expert={layout.ep} writes one per expert-"
                              f"parallel x model-parallel rank (resume or export at the layout it was trained at)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(set(params) - set(saved))
    if missing:
        raise CheckpointError(f"{path}: no {missing[:3]}; written by another model?")
    for n, p in params.items():
        p.copy_(saved[n])     # the fp32 masters, cast to the parameter's dtype
