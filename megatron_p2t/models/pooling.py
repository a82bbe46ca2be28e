"""Pooling of token states into one vector per sequence (stage 1 pools both towers this way)."""
from __future__ import annotations

import torch


def masked_mean_std(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6):
    """Mean and standard deviation over the tokens where mask is True: x [b, s, d], mask [b, s]."""
    m = mask.unsqueeze(-1).to(x.dtype)
    n = m.sum(1).clamp(min=1.0)
    mean = (x * m).sum(1) / n
    var = (((x - mean.unsqueeze(1)) ** 2) * m).sum(1) / n
    return mean, torch.sqrt(var + eps)
