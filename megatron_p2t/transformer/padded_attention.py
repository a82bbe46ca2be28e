"""Bidirectional core attention over a key padding mask, through torch SDPA, in megatron-core's core-attention
slot (ESM-2 and the structure-aware encoder). Given integer segment ids instead of the boolean mask (proteins
packed back to back without padding, models/esm.py), each token attends within its own protein through
transformer/attention.py's kernels for packed rows (model.attention_kernel), non-causal.

megatron-core's local DotProductAttention is unfused: it writes the [b, heads, L, L] scores into a global buffer
that stays allocated, and keeps the fp32 softmax output and the probabilities for backward. At ESM-2-3B's 40
heads and L = 1,024 that is 240 KiB per token and layer, about four times the rest of what a layer keeps. SDPA
keeps only the log-sum-exp per query and head (its fused kernels: FlashAttention on the CPU, the
memory-efficient kernel on a GPU, which takes an additive mask), and computes the same softmax.

The mask is additive, in the query's dtype, built once per layer from megatron's boolean padding mask [b, 1, 1, s]
(True = key not attended), with finfo.min rather than -inf: a row whose keys were all masked would then give
uniform weights, as megatron's -10000 fill does, instead of NaN.

`attention_bias` [b, heads on this rank, s, s] (SEPIT's distance bias) is the whole additive mask, padding
included: the encoder folds the padding into it once (`additive_bias`) rather than every layer writing its own
[b, heads, L, L] copy, which the backward would keep, one per layer. Its last dimension's stride is a multiple of
8, so the GPU kernel does not pad (copy) it either.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from megatron_p2t.transformer.attention import SegmentAttention

# torch's memory-efficient kernel copies an additive mask whose strides are not multiples of 8 (preprocess_mask)
MASK_ALIGNMENT = 8


def padding_to_additive(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron's boolean padding mask (True = not attended) as an additive one in `dtype`."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        attention_mask, torch.finfo(dtype).min)


def additive_bias(bias: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A bias [b, heads, sq, sk] with megatron's padding mask [b, 1, 1, sk] folded in, its rows laid out with a
    stride that is a multiple of MASK_ALIGNMENT (a view into a slightly wider tensor)."""
    s = bias.shape[-1]
    wide = F.pad(bias, (0, -s % MASK_ALIGNMENT))
    return wide.masked_fill(F.pad(attention_mask, (0, -s % MASK_ALIGNMENT), value=True),
                            torch.finfo(bias.dtype).min)[..., :s]


class PaddedAttention(SegmentAttention):
    """SegmentAttention, non-causal, that also takes megatron's boolean padding mask and an additive bias (the
    heads, scale and dropout it reads are SegmentAttention's)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, kernel: str = "auto"):
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is megatron's fp16 workaround for its unfused softmax; "
                             "SDPA keeps the softmax in fp32 and needs no such scaling")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection, kernel=kernel, causal=False)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query/key/value [s, b, heads, d]; attention_mask: megatron's [b, 1, 1, s] bool (True = padding), [b, s]
        integer segment ids, or None; attention_bias: the whole additive mask (see the module's docstring)
        -> [s, b, heads * d]."""
        if packed_seq_params is not None:
            raise NotImplementedError("PaddedAttention takes a padding mask or segment ids, not packed_seq_params")
        if attention_mask is not None and not attention_mask.dtype.is_floating_point and \
                attention_mask.dtype != torch.bool:
            if attention_bias is not None:
                raise ValueError("an attention bias needs the padded batch: the varlen kernels take none")
            return super().forward(query, key, value, attention_mask)
        sq, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))       # [b, heads, s, d]
        if self.heads != self.groups:
            k, v = (x.repeat_interleave(self.heads // self.groups, dim=1) for x in (k, v))
        if attention_bias is not None:
            mask = attention_bias.to(q.dtype)
        elif attention_mask is not None:
            mask = padding_to_additive(attention_mask, q.dtype)
        else:
            mask = None
        p = self.dropout if self.training else 0.0
        if p and not self.config.sequence_parallel:   # dropout per tensor-parallel rank, as megatron's attention
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
