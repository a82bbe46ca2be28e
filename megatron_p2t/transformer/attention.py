"""Causal core attention that understands packed rows, in megatron-core's core-attention slot.

A packed row holds several samples back to back; `attention_mask` is then an integer tensor [b, s] of segment
ids (1, 2, ... per sample, 0 for padding) and each token attends causally within its own segment only. With
no mask, attention is plainly causal. With `causal=False` a token attends to its whole segment (ESM's proteins
packed without padding, transformer/padded_attention.py). Kernels for packed rows (model.attention_kernel; auto
takes the first that can run):
- flash_attn: flash-attn's varlen kernel (cu_seqlens from the segments): CUDA, fp16/bf16, flash-attn installed;
- torch_varlen: PyTorch's own varlen kernel (torch.nn.attention.varlen, its FlashAttention-2 build): CUDA on
  sm80+, fp16/bf16, no attention dropout; what a machine without the flash-attn package has;
- sdpa: torch SDPA with `is_causal` once per sample: causal SDPA runs its flash backend on a GPU and a fused
  kernel on the CPU, which an explicit [s, s] mask would rule out, and the cost is the sum of squared sample
  lengths instead of the squared row length. Rows without segments always take one causal SDPA call.
Segment ids instead of an [s, s] mask keep the batch small, and are what the varlen kernels need.

RoPE is applied by megatron-core from positions 0..s-1 of the row; rotary scores depend only on the distance
between query and key, so within a segment they equal those of the sample alone (the packed-equals-unpacked
test checks it against per-sample positions).
"""
from __future__ import annotations

import collections
import functools
import inspect
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_p2t.transformer.attention_kernels import ATTENTION_KERNELS


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """PyTorch's varlen attention behind flash-attn's calling convention. Its signature moved between releases
    (2.9: is_causal, no scale or GQA; 2.10 and 2.11: window_size (-1, 0) for causal, scale; 2.12: enable_gqa), so the
    arguments follow the installed one."""
    from torch.nn.attention.varlen import varlen_attn
    if dropout_p:
        raise ValueError("PyTorch's varlen attention has no dropout (model.attention_kernel=torch_varlen needs "
                         "attention dropout 0)")
    params = _parameters(varlen_attn)
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = causal
    else:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)   # a tuple: the function compares it with (-1, 0)
    if softmax_scale is not None:
        if "scale" in params:
            kw["scale"] = softmax_scale
        else:                                                  # its fixed scale is 1/sqrt(head_dim)
            q = q * (softmax_scale * math.sqrt(q.shape[-1]))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@functools.lru_cache(maxsize=4)
def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=8)
def _torch_varlen_runs_on(device_index: int) -> bool:
    """PyTorch's varlen kernel is its FlashAttention-2 build: sm80 and newer, and a torch that has it."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (PyTorch 2.9 and newer)
    except ImportError:
        return False
    return torch.backends.cuda.is_flash_attention_available() and \
        torch.cuda.get_device_capability(device_index) >= (8, 0)


def varlen_kernels(query: torch.Tensor, dropout_p: float) -> dict:
    """The varlen kernels that can run on this tensor, best first, each in flash-attn's calling convention."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return {}
    found = {}
    try:
        from flash_attn import flash_attn_varlen_func
        found["flash_attn"] = flash_attn_varlen_func
    except ImportError:
        pass
    if dropout_p == 0.0 and _torch_varlen_runs_on(query.device.index if query.device.index is not None
                                                   else torch.cuda.current_device()):
        found["torch_varlen"] = _torch_varlen
    return found


def kernel_for(kernel: str, query: torch.Tensor, dropout_p: float):
    """(name, varlen function) of what model.attention_kernel=`kernel` runs packed rows with on this tensor;
    the function is None for sdpa. An explicit kernel that cannot run here is an error naming what it needs."""
    if kernel == "sdpa":
        return "sdpa", None
    found = varlen_kernels(query, dropout_p)
    if kernel == "auto":
        return next(iter(found.items()), ("sdpa", None))
    if kernel not in found:
        raise ValueError(f"model.attention_kernel={kernel} cannot run on this {query.device.type} "
                         f"{str(query.dtype).replace('torch.', '')} tensor (attention dropout {dropout_p}): "
                         f"{ATTENTION_KERNELS[kernel]}; auto takes the best that can")
    return kernel, found[kernel]


class SegmentAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, kernel: str = "auto", causal: bool = True):
        super().__init__(config=config)
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: one of {', '.join(ATTENTION_KERNELS)}")
        self.kernel, self.causal = kernel, causal    # causal False: ESM's unpadded proteins (padded_attention.py)
        tp = config.tensor_model_parallel_size  # this rank holds heads / tp of them
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SegmentAttention takes packing as segment ids in attention_mask")
        sq, b = query.shape[:2]
        p = self.dropout if self.training else 0.0
        seg = attention_mask
        if seg is not None and (seg.dtype == torch.bool or seg.dim() != 2):
            raise ValueError("attention_mask must be None (causal) or [b, s] integer segment ids")
        if seg is not None:
            return self._packed(kernel_for(self.kernel, query, p)[1], query, key, value, seg, p)
        rep = self.heads // self.groups
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))        # [b, heads, s, d]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, varlen, query, key, value, seg, p):
        """The real tokens [T, heads, d], sample after sample, through `varlen` (None: SDPA per sample), scattered
        back to [s, b, heads * d] with zeros at padding (segment 0)."""
        sq, b = query.shape[:2]
        pk = packing(seg)
        q, k, v = (x.reshape(sq * b, *x.shape[2:])[pk.keep] for x in (query, key, value))
        if varlen is not None:
            out = varlen(q, k, v, pk.cu, pk.cu, pk.max_len, pk.max_len, dropout_p=p, softmax_scale=self.scale,
                         causal=self.causal)
        else:
            out = self._per_sample(q, k, v, pk.bounds, p)
        full = out.new_zeros(sq * b, *out.shape[1:])
        full[pk.keep] = out
        return full.view(sq, b, -1)

    def _per_sample(self, q, k, v, bounds, p):
        """SDPA once per sample over [T, heads, d] tokens; the sample bounds come from the memoised packing, so a
        layer stops the host for none of them."""
        rep = self.heads // self.groups
        outs = []
        for a, e in zip(bounds[:-1], bounds[1:]):
            qq, kk, vv = (x[a:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))       # [1, heads, n, d]
            if rep > 1:
                kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, dropout_p=p, is_causal=self.causal,
                                                       scale=self.scale)[0].transpose(0, 1))
        return torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])


class Unpadded(NamedTuple):
    keep: torch.Tensor      # the real tokens' places in a [b, s] batch flattened row after row
    seg: torch.Tensor       # [1, T] segment ids 1..b: the rows back to back as one packed row
    pos: torch.Tensor       # [T] each token's position in its own row


def unpad(mask: torch.Tensor) -> Unpadded:
    """A padded batch's real tokens (mask [b, s], True = real) as one packed row: a layer stack given them with
    `seg` as its attention mask computes nothing for padding (models/esm.py, models/text_side.py)."""
    b, s = mask.shape
    keep = mask.bool().flatten().nonzero().squeeze(1)
    seg = torch.arange(1, b + 1, device=mask.device).repeat_interleave(s)[keep].unsqueeze(0)
    return Unpadded(keep, seg, torch.arange(s, device=mask.device).repeat(b)[keep])


def repad(y: torch.Tensor, u: Unpadded, b: int, s: int) -> torch.Tensor:
    """[T, h] values of the real tokens -> [b, s, h], zero at padding."""
    return y.new_zeros(b * s, y.shape[-1]).index_put((u.keep,), y).view(b, s, -1)


class Packing(NamedTuple):
    keep: torch.Tensor      # where the real tokens sit in the [s*b] token order, row by row
    cu: torch.Tensor        # int32 cumulative sample lengths over those tokens (cu_seqlens)
    max_len: int
    bounds: tuple           # cu on the host, for SDPA per sample


# key -> (segment tensor, held so its memory is not reused while keyed, Packing); a few, because a pipeline
# schedule recomputes one micro-batch's chunks while the next ones' forwards have already run
_packings: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_PACKINGS_KEPT = 8


def _key(seg: torch.Tensor) -> tuple:
    # views of one tensor (megatron-core's recompute hands its layers a detached one) share the data pointer and
    # the version counter, which an in-place write moves on
    return seg.data_ptr(), seg.shape, seg.stride(), seg.dtype, seg.device, seg._version


def packing(seg: torch.Tensor) -> Packing:
    """The packed kernels' view of a [b, s] segment-id tensor. Working it out costs three host syncs (two
    nonzero, one copy of cu to the host); megatron-core hands every layer the same mask tensor (a recomputed chunk
    a detached view of it), so it is worked out once per micro-batch and again only when a changed tensor comes
    (per layer it cost seven syncs: 224 in a 32-layer forward; SDPA per sample cost one per row and layer)."""
    key = _key(seg)
    if key in _packings:
        _packings.move_to_end(key)
        return _packings[key][1]
    b = seg.shape[0]
    rows, cols = torch.nonzero(seg > 0, as_tuple=True)              # row-major: sample after sample
    ids = seg[rows, cols]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = (ids[1:] != ids[:-1]) | (rows[1:] != rows[:-1])
    cu = F.pad(torch.nonzero(starts).flatten(), (0, 1), value=ids.numel()).to(torch.int32)
    bounds = tuple(cu.tolist()) if ids.numel() else (0,)
    found = Packing(cols * b + rows, cu, max(e - a for a, e in zip(bounds[:-1], bounds[1:])) if ids.numel() else 0,
                    bounds)
    _packings[key] = (seg, found)
    while len(_packings) > _PACKINGS_KEPT:
        _packings.popitem(last=False)
    return found
