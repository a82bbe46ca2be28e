"""H-SCALE contrastive alignment losses, with the data-parallel gather beside them (open_clip's loss.py shape).

Negatives come from every data-parallel rank: each rank scores its own B proteins against all W*B texts, so the
logits are [B, W*B] per rank (memory O(B*W*B), never (W*B)^2), and the gather passes gradients back to the rank
that produced each vector. Gather over the data-parallel group only: tensor/pipeline peers hold the same samples.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: torch.Tensor, group=None) -> Tuple[torch.Tensor, int]:
    """(all ranks' rows, offset of this rank's rows). Equal row counts per rank are required (the loader's
    fixed batch size guarantees them). Without torch.distributed, or with one rank, x itself."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x, 0
    n = x.shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], device=x.device), group=group)  # x's device: NCCL takes CUDA only
    if any(int(s) != n for s in sizes):
        raise ValueError(f"contrastive gather needs equal batch sizes on every data-parallel rank, got "
                         f"{[int(s) for s in sizes]}; use fixed batch_size batches")
    return _GatherWithGrad.apply(x, group), dist.get_rank(group) * n


def info_nce(query: torch.Tensor, keys_local: torch.Tensor, temperature, group=None, symmetric: bool = False,
             normalize: bool = True) -> torch.Tensor:
    """InfoNCE of query i against key i, negatives = every key on every data-parallel rank.
    Returns this rank's mean over its rows; averaging over ranks gives the loss of the whole global batch."""
    if normalize:
        query, keys_local = F.normalize(query, dim=-1), F.normalize(keys_local, dim=-1)
    keys, offset = gather_with_grad(keys_local, group)
    target = torch.arange(query.shape[0], device=query.device) + offset
    loss = F.cross_entropy(query @ keys.t() / temperature, target)
    if symmetric:
        queries, _ = gather_with_grad(query, group)
        loss = 0.5 * (loss + F.cross_entropy(keys_local @ queries.t() / temperature, target))
    return loss


def _unknown_variant(variant) -> ValueError:
    return ValueError(f"unknown H-SCALE variant {variant!r}: 'paper' or 'concat'")


def hscale_loss(prot_mean, prot_std, text_mean, text_std, temperature, weights=(0.7, 0.3), group=None,
                symmetric: bool = False, variant: str = "paper") -> torch.Tensor:
    """Prot2Text-V2's H-SCALE. "paper": w_mean * InfoNCE(mean_p, mean_t) + w_std * InfoNCE(std_p, std_t).
    "concat" (the released code): one InfoNCE on L2-normalised [mean; std]."""
    if variant == "paper":
        return (weights[0] * info_nce(prot_mean, text_mean, temperature, group, symmetric)
                + weights[1] * info_nce(prot_std, text_std, temperature, group, symmetric))
    if variant == "concat":
        p = torch.cat([prot_mean, prot_std], -1)
        t = torch.cat([text_mean, text_std], -1)
        return info_nce(p, t, temperature, group, symmetric)
    raise _unknown_variant(variant)


def hscale_scores(prot_mean, prot_std, text_mean, text_std, weights=(0.7, 0.3), variant: str = "paper"):
    """Similarity of every protein to every text as the loss scores them, before the temperature: [n_p, n_t].
    Retrieval ranks by this and not by the cosine of [mean; std] in both variants: the std vectors of a frozen
    tower share one direction (pairwise cosine ~0.99 for the tiny LLaMA), so in the paper's variant they would
    drown the means that the loss weighs 0.7."""
    if variant == "paper":
        return (weights[0] * F.normalize(prot_mean, dim=-1) @ F.normalize(text_mean, dim=-1).t()
                + weights[1] * F.normalize(prot_std, dim=-1) @ F.normalize(text_std, dim=-1).t())
    if variant == "concat":
        return (F.normalize(torch.cat([prot_mean, prot_std], -1), dim=-1)
                @ F.normalize(torch.cat([text_mean, text_std], -1), dim=-1).t())
    raise _unknown_variant(variant)


def rank_of_own(scores: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """For query i, how many keys score strictly above its own key (offset + i): 0 = retrieved first."""
    own = scores[torch.arange(scores.shape[0]), torch.arange(scores.shape[0]) + offset]
    return (scores > own[:, None]).sum(1)


def retrieval_accuracy(prot_mean, prot_std, text_mean, text_std, group=None, k: int = 1, weights=(0.7, 0.3),
                       variant: str = "paper") -> torch.Tensor:
    """Fraction of this rank's proteins whose own text is among the k best-scored of all ranks' texts."""
    tm, offset = gather_with_grad(text_mean.detach(), group)
    ts, _ = gather_with_grad(text_std.detach(), group)
    scores = hscale_scores(prot_mean.detach(), prot_std.detach(), tm, ts, weights, variant)
    return (rank_of_own(scores, offset) < k).float().mean()
