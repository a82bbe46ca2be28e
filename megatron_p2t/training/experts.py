"""Experts under expert parallelism (parallel.expert > 1), trained beside DeepSpeed's engine.

DeepSpeed's ZeRO partitions, reduces and broadcasts every parameter it is given over the data-parallel group,
which is right for everything but experts: with expert parallelism, data-parallel ranks hold *different* experts
(megatron-core marks them `allreduce=False`). DeepSpeed's own MoE support expects its own MoE layer class (it
looks for `deepspeed.moe.layer.MoE` to switch it on, and writes expert checkpoints by that class's names), so
megatron-core's experts are kept out of the engine's optimizer and stepped here, the way megatron-core's
distributed optimizer treats them:
- their fp32 master copies and AdamW state partitioned over the expert-data-parallel group (the ranks holding the
  same experts, data-parallel size / expert-parallel size), as ZeRO-1 and megatron-core's distributed optimizer
  partition theirs: each tensor has one owner there (balanced by size), its gradient is reduced to the owner,
  summed over the group and divided by the data-parallel size (every expert gets the mean over all data-parallel
  ranks' tokens, as a dense parameter), stepped there, and the new weights are broadcast from it;
- clipped, with everything else, by one global norm at train.clip_grad, as Megatron-LM clips: the experts' norm
  (every expert of every rank) is computed before DeepSpeed's step and joined to the norm DeepSpeed's ZeRO
  optimizer computes inside it (`join_norm` extends that one method of the engine's optimizer), so DeepSpeed
  clips the other parameters, and this optimizer the experts, by sqrt(dense^2 + experts^2);
- AdamW with the run's hyperparameters and learning-rate schedule;
- checkpoints: the fp32 weights per (expert-parallel rank, model-parallel rank) next to DeepSpeed's files
  (`experts_epEE_mpMM.pt`, gathered from their owners; export reads them), each rank's optimizer state for the
  tensors it owns in its own extra file.
DeepSpeed still broadcasts every parameter of the module at start-up; the experts' go over the expert-data-
parallel group, which `register_groups` names to it under its own convention (`ep_size_N`).
"""
from __future__ import annotations

import math
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


def owners(sizes: List[int], n: int) -> List[int]:
    """Which of n ranks owns each tensor (by element count): largest first, to the least loaded (ties: lowest
    rank). Every rank of an expert-data-parallel group holds the same tensors, so all compute the same answer."""
    load = [0] * n
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(n), key=lambda r: (load[r], r))
        out[i], load[r] = r, load[r] + sizes[i]
    return out


class ExpertOptimizer:
    """AdamW over fp32 master copies of the experts this rank owns (the weights themselves may be bf16, as
    DeepSpeed's bf16 optimizer keeps its own masters), reduced, clipped and broadcast as the module docstring
    says, one tensor at a time (no flat copy of every expert's gradient)."""

    def __init__(self, named_params, tc, layout: Layout, lr_lambda):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.layout, self.clip = layout, tc.clip_grad
        self.group = layout.expert_dp_group
        self.expert_dp = dist.get_world_size(group=self.group)
        self.owner = [dist.get_global_rank(self.group, r)        # global ranks, as the collectives take them
                      for r in owners([p.numel() for p in self.params], self.expert_dp)]
        self.mine = [o == dist.get_rank() for o in self.owner]
        self.master = [torch.nn.Parameter(p.detach().float().clone()) if own else None
                       for p, own in zip(self.params, self.mine)]
        owned = [m for m in self.master if m is not None]
        # a rank owning nothing (more ranks than expert tensors) still steps the schedule with the others
        self.opt = torch.optim.AdamW(owned or [torch.nn.Parameter(torch.zeros(0))], lr=tc.lr,
                                     betas=tuple(tc.adam_betas), eps=tc.adam_eps, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.last_norm = None       # the experts' gradient norm of the last step
        self.pending = None         # ... between `reduce` and `apply`, for `join_norm`
        self.total_norm = None      # with DeepSpeed's (join_norm), as both were clipped by

    @torch.no_grad()
    def take_weights(self) -> None:
        """Masters from the weights as they are now: after DeepSpeed's start-up broadcast, which gives every rank
        holding these experts the first one's."""
        for p, m in zip(self.params, self.master):
            if m is not None:
                m.copy_(p)

    def owned_names(self) -> List[str]:
        return [n for n, own in zip(self.names, self.mine) if own]

    def reduce(self) -> float:
        """Collective: the accumulated gradients reduced to their owners (every rank, every optimizer step, before
        DeepSpeed's); their global norm, which `join_norm` adds to DeepSpeed's."""
        dev = collective_device()
        sq = torch.zeros(1, dtype=torch.float64, device=dev)
        for p, m, owner, own in zip(self.params, self.master, self.owner, self.mine):
            g = (p.grad if p.grad is not None else torch.zeros_like(p)).to(dev, torch.float32)
            p.grad = None
            if self.expert_dp > 1:
                dist.reduce(g, dst=owner, group=self.group)
            if own:
                g /= self.layout.dp
                sq += (g.double() ** 2).sum()
                m.grad = g.to(m.device)
        dist.all_reduce(sq)     # each expert tensor counted once, by its owner, over every rank's experts
        self.last_norm = self.pending = float(sq) ** 0.5
        self.total_norm = None
        return self.last_norm

    def apply(self) -> None:
        """Clip by the total norm (`join_norm`'s; the experts' own when DeepSpeed computed none), step, and
        broadcast the new weights. A norm that is not finite skips the step, as DeepSpeed skips its own then."""
        self.pending = None
        norm = self.last_norm if self.total_norm is None else self.total_norm
        if not math.isfinite(norm):
            for m in self.master:
                if m is not None:
                    m.grad = None
            return
        if self.clip and norm > self.clip:
            for m in self.master:
                if m is not None:
                    m.grad.mul_(self.clip / (norm + 1e-6))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        dev = collective_device()
        with torch.no_grad():
            for p, m, owner, own in zip(self.params, self.master, self.owner, self.mine):
                if own:
                    p.copy_(m)
                if self.expert_dp > 1:
                    buf = p.data.to(dev)
                    dist.broadcast(buf, src=owner, group=self.group)
                    if buf.data_ptr() != p.data.data_ptr():
                        p.copy_(buf)

    def join_norm(self, zero_optimizer) -> None:
        """Make `zero_optimizer` (DeepSpeed's ZeRO-1/2 optimizer, DeepSpeedZeroOptimizer) clip by the norm of its
        gradients and the experts' together, and remember that norm for `apply`. DeepSpeed computes the norm it
        clips by in this one method (scaled by its loss scale, 1 in bf16 and fp32); its step then records the
        joined norm as the engine's global gradient norm."""
        own = zero_optimizer.scaled_global_norm

        def joined(norm_type=2):
            dense = own(norm_type)
            if self.pending is None:        # a step without the experts' reduce before it: DeepSpeed's alone
                return dense
            scale = float(getattr(zero_optimizer, "loss_scale", 1.0))
            d = float(dense)
            if d < 0 or not math.isfinite(d):   # DeepSpeed's mark of a non-finite norm (-1), or one: left as it is
                self.total_norm = math.inf
                return dense
            total = (d ** 2 + (self.pending * scale) ** 2) ** 0.5
            self.total_norm = total / scale
            return torch.tensor(total, dtype=dense.dtype, device=dense.device) if torch.is_tensor(dense) else total
        zero_optimizer.scaled_global_norm = joined

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "owned": self.owned_names()}

    def load_state_dict(self, s: dict) -> None:
        owned = s.get("owned", self.names)     # written before the state was partitioned: it held every tensor
        if owned != self.owned_names():
            raise CheckpointError(f"the experts' optimizer state was written for {len(owned)} tensors on this rank, "
                                  f"this run gives it {len(self.owned_names())}: resume at the layout the run had "
                                  f"(parallel.expert={self.layout.ep}, data-parallel size {self.layout.dp})")
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])

    def save_weights(self, directory: str) -> None:
        """Collective over the expert-data-parallel group: its first rank gathers the fp32 masters from their
        owners and writes them."""
        first = dist.get_rank(group=self.group) == 0
        out = {}
        dev = collective_device()
        for n, p, m, owner, own in zip(self.names, self.params, self.master, self.owner, self.mine):
            if first and own:
                out[n] = m.detach().cpu().clone()
            elif first:
                buf = torch.empty(p.shape, dtype=torch.float32, device=dev)
                dist.recv(buf, src=owner, group=self.group)
                out[n] = buf.cpu()
            elif own:
                dist.send(m.detach().to(dev), dst=dist.get_global_rank(self.group, 0), group=self.group)
        if first:
            torch.save(out, os.path.join(directory, weights_name(self.layout.ep_rank, self.layout.mp_rank)))

    @torch.no_grad()
    def load_weights(self, directory: str) -> None:
        saved = read_weights(self.names, directory, self.layout)
        for n, p, m in zip(self.names, self.params, self.master):
            p.copy_(saved[n])
            if m is not None:
                m.copy_(saved[n])


def weights_name(ep_rank: int, mp_rank: int) -> str:
    return f"experts_ep{ep_rank:02d}_mp{mp_rank:02d}.pt"


def read_weights(names: List[str], directory: str, layout: Layout) -> dict:
    """A run's fp32 experts for this (expert-parallel, model-parallel) rank, name -> tensor."""
    path = os.path.join(directory, weights_name(layout.ep_rank, layout.mp_rank))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; a run with parallel.expert={layout.ep} writes one per expert-"
                              f"parallel x model-parallel rank (resume or export at the layout it was trained at)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(set(names) - set(saved))
    if missing:
        raise CheckpointError(f"{path}: no {missing[:3]}; written by another model?")
    return saved


@torch.no_grad()
def load_weights(params: dict, directory: str, layout: Layout) -> None:
    """A run's experts for this (expert-parallel, model-parallel) rank into `params` (name -> parameter)."""
    saved = read_weights(list(params), directory, layout)
    for n, p in params.items():
        p.copy_(saved[n])     # the fp32 masters, cast to the parameter's dtype
