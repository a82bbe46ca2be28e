"""ESM-2 that also reads 3D structure (SEPIT's structure-aware encoder), `model.encoder: esm2_structure`.

The C-alpha distance of every residue pair is expanded on Gaussian basis kernels (learned centres and widths,
128 by default) and turned by a small MLP into one additive bias per attention head, the same bias in every
layer (Graphormer / Transformer-M's spatial encoding); each residue's kernel features summed over the other
residues, projected to the hidden size and scaled down, are added to its token embedding. Pairs with a
missing residue (no coordinates, <cls>/<eos>, padding) get no bias and add no feature.

Exactness: with no coordinates the bias is skipped and every operation is ESMEncoder's, so the outputs equal the
plain ESM-2's bit for bit; a protein without coordinates in a batch with others gets a bias and a feature of
exactly zero, which adds nothing to the logits and embeddings it is added to.

Tensor parallelism: the bias MLP's last layer is column-parallel over heads, so each rank computes the bias
of the heads it owns (megatron's all-reduce of that layer's input gradient keeps the replicated kernels and
first layer in step across ranks).

Memory: the [L, L, kernels] expansion is 509 MiB at L=1021 in fp32 per protein, more than the rest of a layer.
It is computed for `model.structure.chunk` query rows at a time under activation checkpointing, so only one
chunk's expansion is alive, in the forward and again in the backward; what is kept is the bias itself, [heads, L,
L], with the padding folded in, one tensor that every layer's attention reads (transformer/padded_attention.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_p2t.models.esm import ESMConfig, ESMEncoder
from megatron_p2t.models.parts_config import StructureConfig
from megatron_p2t.parallel.layout import Layout


# Most pairs are far from most kernel centres, so most exponents are very negative. On a CPU exp is about 5x slower
# there (below about -88 its results are denormal or 0) than on [-60, 0], measured on 8.4M floats; and tiny nonzero
# results make the next layers' products denormal (exp(-60) in place of 0 made the bias 4x slower at L=1021). So
# exp runs on the exponent clamped at -60 and what lies under it is set to exactly 0: values below 8.7e-27 lost,
# beside a kernel's peak of 1 / (sqrt(2 pi) sigma).
_LOG_FLOOR = -60.0


class _GaussianKernels(torch.autograd.Function):
    """phi = exp(-z^2 / 2) / (sqrt(2 pi) sigma), z = (d - mu) / sigma, set to 0 where mask is False or under the
    floor, with its gradient written out: the [..., K] expansion is the distance bias's largest tensor, and autograd
    through the formula kept several copies of it for the backward, one per term; this keeps z and phi. A pair
    whose phi is 0 gets no gradient (g * phi)."""

    @staticmethod
    def forward(ctx, d, means, stds, mask):
        inv = 1.0 / (stds.abs() + 1e-5)
        z = (d.unsqueeze(-1) - means) * inv
        log_phi = torch.addcmul(torch.log(inv * (1 / math.sqrt(2 * math.pi))), z, z, value=-0.5)
        drop = log_phi < _LOG_FLOOR
        if mask is not None:
            drop |= ~mask.unsqueeze(-1)
        phi = log_phi.clamp_(min=_LOG_FLOOR).exp_().masked_fill_(drop, 0.0)
        ctx.save_for_backward(z, phi, inv, stds)
        return phi

    @staticmethod
    def backward(ctx, grad):
        z, phi, inv, stds = ctx.saved_tensors
        g = grad * phi                                                # d phi / d z = -z phi
        gz = g * z
        lead = tuple(range(gz.dim() - 1))
        d_grad = -(gz * inv).sum(-1) if ctx.needs_input_grad[0] else None
        means_grad = gz.sum(lead) * inv if ctx.needs_input_grad[1] else None
        # d phi / d inv = phi (1 - z^2) / inv and d inv / d sigma = -inv^2 sign(sigma)
        stds_grad = -(g - gz * z).sum(lead) * inv * torch.sign(stds) if ctx.needs_input_grad[2] else None
        return d_grad, means_grad, stds_grad, None


def gaussian_kernels(d: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[..., K] densities of d [...] under K Gaussians (Transformer-M's GaussianLayer, in float32), 0 where the
    optional mask [...] is False."""
    return _GaussianKernels.apply(d.float(), means.float(), stds.float(), None if mask is None else mask.bool())


class DistanceBias(MegatronModule):
    """coords [b, s, 3], known [b, s] -> (attention bias [b, heads on this rank, s, s], embedding term [b, s, h])."""

    def __init__(self, cfg: StructureConfig, esm_cfg: ESMConfig, config):
        super().__init__(config)   # a MegatronModule: its checkpoint keeps linear_heads split by heads
        tp = config.tensor_model_parallel_size or 1
        if esm_cfg.num_attention_heads % tp:
            raise ValueError(f"{esm_cfg.num_attention_heads} ESM attention heads do not divide over tensor-parallel "
                             f"size {tp}")
        k, dtype = cfg.kernels, config.params_dtype
        self.cfg, self.heads = cfg, esm_cfg.num_attention_heads // tp
        # centres spread over the distances that matter to a fold, widths as the spacing
        self.means = nn.Parameter(torch.linspace(0.0, cfg.max_distance, k, dtype=dtype))
        self.stds = nn.Parameter(torch.full((k,), 2.0 * cfg.max_distance / k, dtype=dtype))
        self.linear_fc1 = nn.Linear(k, k, dtype=dtype)
        init = lambda w: nn.init.normal_(w, 0.0, 0.02)
        self.linear_heads = ColumnParallelLinear(k, esm_cfg.num_attention_heads, config=config, init_method=init,
                                                 bias=True, gather_output=False)
        self.linear_embed = nn.Linear(k, esm_cfg.hidden_size, dtype=dtype)
        for lin in (self.linear_fc1, self.linear_embed):
            init(lin.weight)
            nn.init.zeros_(lin.bias)

    def _rows(self, xi, x, pair):
        """One chunk of query rows: xi [b, c, 3] against x [b, s, 3]; pair [b, c, s] (both residues known)."""
        phi = gaussian_kernels(torch.cdist(xi.float(), x.float()), self.means, self.stds, pair)   # [b, c, s, K]
        dtype = self.linear_fc1.weight.dtype
        h = F.gelu(self.linear_fc1(phi.to(dtype)))
        bias, _ = self.linear_heads(h.flatten(0, 2).unsqueeze(1))    # megatron's linears take [tokens, batch, in]
        bias = bias.view(*h.shape[:3], -1)                                                  # [b, c, s, heads]
        return bias * pair.unsqueeze(-1).to(bias.dtype), phi.sum(2)

    def forward(self, coords: torch.Tensor, known: torch.Tensor):
        b, s, _ = coords.shape
        known = known.bool()
        coords = coords.masked_fill(~known.unsqueeze(-1), 0.0)
        biases, feats = [], []
        for a in range(0, s, self.cfg.chunk):
            pair = known[:, a:a + self.cfg.chunk, None] & known[:, None, :]
            args = (coords[:, a:a + self.cfg.chunk], coords, pair)
            if torch.is_grad_enabled():
                bias, feat = checkpoint(self._rows, *args, use_reentrant=False)
            else:
                bias, feat = self._rows(*args)
            biases.append(bias)
            feats.append(feat)
        bias = torch.cat(biases, 1).permute(0, 3, 1, 2)                                   # [b, heads, s, s]
        feat = torch.cat(feats, 1).to(self.linear_embed.weight.dtype)                     # [b, s, K]
        return bias.contiguous(), self.linear_embed(feat) * self.cfg.embed_scale * known.unsqueeze(-1)


class StructureESMEncoder(ESMEncoder):
    """ESMEncoder + DistanceBias. forward(ids, mask, coords=None, coords_mask=None): coords [b, s, 3] per ESM token
    (<cls> first, as the ids), coords_mask [b, s] True where a residue has coordinates. A batch with coordinates
    runs padded (the bias is [b, heads, L, L], which the varlen kernels take none of); one without, as ESMEncoder."""

    def __init__(self, cfg: ESMConfig, structure: StructureConfig, output_layer: int = -1,
                 params_dtype=torch.float32, layout: Layout | None = None, recompute: bool = False,
                 attention_kernel: str = "auto", unpad: bool = True, **config_overrides):
        super().__init__(cfg, output_layer, params_dtype, layout, recompute=recompute,
                         attention_kernel=attention_kernel, unpad=unpad, **config_overrides)
        self.structure = DistanceBias(structure, cfg, self.config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, coords: Optional[torch.Tensor] = None,
                coords_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if coords is None or coords_mask is None or not bool(coords_mask.any()):
            return super().forward(ids, mask)
        known = coords_mask.bool() & mask.bool()
        bias, extra = self.structure(coords, known)
        x = (self.embed(ids, mask) + extra.to(self.config.params_dtype)).transpose(0, 1).contiguous()
        return self.run_block(x, ids, mask, attention_bias=bias)


class DenoisingHead(nn.Module):
    """The warm-up's coordinate denoising: from the encoder's last states and the noised coordinates, predict the
    noise added to each residue, as a sum of unit pair directions weighted by per-head attention (Transformer-M's
    3D position head): logits from the states plus a bias from the pair's noised distance (its own few Gaussian
    kernels), so a head can attend to spatial neighbours. Rotating and moving the input rotates the prediction."""

    def __init__(self, hidden: int, heads: int, dtype=torch.float32, kernels: int = 16, max_distance: float = 32.0):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.linear_qk = nn.Linear(hidden, 2 * hidden, dtype=dtype)
        self.means = nn.Parameter(torch.linspace(0.0, max_distance, kernels, dtype=dtype))
        self.stds = nn.Parameter(torch.full((kernels,), max_distance / kernels, dtype=dtype))
        self.linear_pair = nn.Linear(kernels, heads, dtype=dtype)
        self.linear_out = nn.Linear(heads, 1, bias=False, dtype=dtype)

    def forward(self, states, noisy, known):
        """states [b, s, h], noisy [b, s, 3], known [b, s] -> predicted noise [b, s, 3]."""
        q, k = self.linear_qk(states).float().unflatten(-1, (2 * self.heads, self.head_dim)).chunk(2, dim=2)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(self.head_dim)
        delta = noisy.float()[:, :, None] - noisy.float()[:, None, :]                           # [b, s, s, 3]
        dist = delta.norm(dim=-1)
        pair_bias = self.linear_pair(gaussian_kernels(dist, self.means, self.stds).to(self.linear_pair.weight.dtype))
        logits = logits + pair_bias.float().permute(0, 3, 1, 2)
        pair = known[:, None, :, None] & known[:, None, None, :]
        attn = torch.softmax(logits.masked_fill(~pair, -1e4), -1) * pair                       # [b, h, s, s]
        unit = delta / (dist.unsqueeze(-1) + 1e-2)
        vec = torch.einsum("bhij,bijc->bich", attn, unit)                                       # [b, s, 3, h]
        return self.linear_out(vec.to(self.linear_out.weight.dtype)).squeeze(-1)
