"""Stage 1's step: the AlignModel's pooled vectors scored by H-SCALE, negatives from the whole data-parallel
group (or this rank's batch only, as the released code)."""
from __future__ import annotations

import torch.distributed as dist

from megatron_p2t.training.loss import hscale_loss, retrieval_accuracy


def align_loss(engine, batch, align_cfg, dp_group=None):
    """(loss, metrics) of this rank's batch through `engine` (the DeepSpeed engine or the AlignModel itself)."""
    pm, ps, tm, ts = engine(batch)
    model = getattr(engine, "module", engine)
    group = dp_group if align_cfg.gather_negatives else _single_group()
    temp = model.temperature()
    loss = hscale_loss(pm, ps, tm, ts, temp, weights=tuple(align_cfg.weights), group=group,
                       symmetric=align_cfg.symmetric, variant=align_cfg.variant)
    acc = retrieval_accuracy(pm, ps, tm, ts, group, weights=tuple(align_cfg.weights), variant=align_cfg.variant)
    return loss, {"acc_top1": acc, "temperature": temp.detach()}


_SINGLE = {}


def _single_group():
    """A group holding only this rank: negatives from the local batch only (the released code's behaviour)."""
    if not dist.is_initialized():
        return None
    if "g" not in _SINGLE:
        groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
        _SINGLE["g"] = groups[dist.get_rank()]
    return _SINGLE["g"]
