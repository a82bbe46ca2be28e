"""Causal core attention that understands packed rows, in megatron-core's core-attention slot.

A packed row holds several samples back to back; `attention_mask` is then an integer tensor [b, s] of segment
ids (1, 2, ... per sample, 0 for padding) and each token attends causally within its own segment only. With
no mask, attention is plainly causal. Kernels, best first:
- flash-attn's varlen kernel (cu_seqlens from the segments): CUDA, fp16/bf16, flash-attn installed;
- torch SDPA with `is_causal`, once per row without segments, else once per sample: causal SDPA runs its
  flash backend on a GPU and a fused kernel on the CPU, which an explicit [s, s] mask would rule out, and the
  cost is the sum of squared sample lengths instead of the squared row length.
Segment ids instead of an [s, s] mask keep the batch small, and are what the varlen kernel needs.

RoPE is applied by megatron-core from positions 0..s-1 of the row; rotary scores depend only on the distance
between query and key, so within a segment they equal those of the sample alone (the packed-equals-unpacked
test checks it against per-sample positions).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def _flash_varlen(query: torch.Tensor):
    """flash-attn's varlen function when it can run on this tensor, else None."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except ImportError:
        return None


class SegmentAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size  # this rank holds heads / tp of them
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, use_varlen: bool = True):
        """use_varlen=False keeps to SDPA (the device check compares the two kernels)."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SegmentAttention takes packing as segment ids in attention_mask")
        sq, b = query.shape[:2]
        p = self.dropout if self.training else 0.0
        seg = attention_mask
        if seg is not None and (seg.dtype == torch.bool or seg.dim() != 2):
            raise ValueError("attention_mask must be None (causal) or [b, s] integer segment ids")
        varlen = _flash_varlen(query) if seg is not None and use_varlen else None
        if varlen is not None:
            return self._varlen(varlen, query, key, value, seg, p)
        rep = self.heads // self.groups
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))        # [b, heads, s, d]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if seg is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale)
        else:
            out = torch.cat([self._row(q[r:r + 1], k[r:r + 1], v[r:r + 1], seg[r], p) for r in range(b)])
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _row(self, q, k, v, seg, p):
        """One packed row [1, heads, s, d]: causal attention inside each sample; padding (segment 0) gives 0."""
        ids, counts = torch.unique_consecutive(seg, return_counts=True)
        parts, at = [], 0
        for sid, n in zip(ids.tolist(), counts.tolist()):
            if sid == 0:
                parts.append(q.new_zeros(1, q.shape[1], n, v.shape[-1]))
            else:
                parts.append(F.scaled_dot_product_attention(q[:, :, at:at + n], k[:, :, at:at + n],
                                                            v[:, :, at:at + n], dropout_p=p, is_causal=True,
                                                            scale=self.scale))
            at += n
        return torch.cat(parts, 2)

    def _varlen(self, varlen, query, key, value, seg, p):
        sq, b = query.shape[:2]
        order = torch.arange(sq * b, device=seg.device).view(sq, b).t().reshape(-1)
        seg_bs = seg.reshape(-1)
        keep = order[seg_bs > 0]             # indices into the [s*b] token order of the real tokens, row by row
        ids = seg_bs[seg_bs > 0] + torch.repeat_interleave(torch.arange(b, device=seg.device) * (int(seg.max()) + 1),
                                                              (seg > 0).sum(1))
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        q, k, v = (x.reshape(sq * b, *x.shape[2:])[keep] for x in (query, key, value))
        out = varlen(q, k, v, cu, cu, int(counts.max()), int(counts.max()), dropout_p=p, softmax_scale=self.scale,
                     causal=True)
        full = out.new_zeros(sq * b, *out.shape[1:])
        full[keep] = out
        return full.view(sq, b, -1)
