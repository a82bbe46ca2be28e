"""Protein2Text's connector: a Perceiver resampler over the ESM states, then LLaVA's `mlp2x_gelu`.

A fixed set of learned latents (128) reads the protein: in each layer the latents cross-attend to
[ESM states; latents] (Flamingo's PerceiverAttention: both sides LayerNorm-ed, no biases), then pass a
LayerNorm-ed feed-forward; both with residuals, and a final LayerNorm. It works at the ESM width; `mlp2x_gelu`
(Linear ESM -> LLM, GELU, Linear LLM -> LLM) then maps the latents into the decoder. A protein thus puts the
same number of vectors into the prompt whatever its length.

Proteins of different lengths share a batch: padded ESM positions are masked out of the keys (the released
code runs the resampler on one protein at a time instead). Under tensor parallelism the attention heads and the
feed-forward are split as in megatron-core's layers: q / kv / fc1 column-parallel, the output projection and
fc2 row-parallel, one all-reduce each; norms and latents are replicated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_p2t.models.parts_config import ResamplerConfig
from megatron_p2t.models.specs import norms_in


def torch_default(fan_in: int):
    """nn.Linear's own weight init, U(+-1/sqrt(fan_in)), as the released modules start (LLaVA's builder and
    Flamingo's resampler use plain nn.Linear). fan_in is the whole matrix's: a row-parallel rank initialises a
    slice of it. megatron's N(0, 0.02), scaled down again for output layers, leaves a fresh resampler's
    contribution a few percent of its random latents, so the protein barely reaches the decoder at first."""
    bound = fan_in ** -0.5
    return lambda w: nn.init.uniform_(w, -bound, bound)


def _column(n_in, n_out, config, bias):
    return ColumnParallelLinear(n_in, n_out, config=config, init_method=torch_default(n_in), bias=bias,
                                gather_output=False)


def _row(n_in, n_out, config, bias):
    return RowParallelLinear(n_in, n_out, config=config, init_method=torch_default(n_in), bias=bias,
                             input_is_parallel=True, skip_bias_add=False)


def _tp(config) -> int:
    return config.tensor_model_parallel_size or 1


class ResamplerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig, dim: int, config):
        super().__init__()
        inner, tp = cfg.heads * cfg.head_dim, _tp(config)
        if cfg.heads % tp:
            raise ValueError(f"model.resampler.heads={cfg.heads} is not divisible by tensor-parallel size {tp}")
        self.heads, self.head_dim = cfg.heads // tp, cfg.head_dim     # this rank's heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.linear_q = _column(dim, inner, config, bias=False)
        self.linear_kv = _column(dim, 2 * inner, config, bias=False)  # this rank's [k heads; v heads]
        self.linear_proj = _row(inner, dim, config, bias=False)
        self.norm_ff = nn.LayerNorm(dim)
        self.linear_fc1 = _column(dim, dim * cfg.ff_mult, config, bias=False)
        self.linear_fc2 = _row(dim * cfg.ff_mult, dim, config, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:             # [b, n, heads*d] -> [b, heads, n, d]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """media [b, lp, dim], latents [b, n, dim], keep [b, 1, 1, lp + n] (True: attend)."""
        x, lat = self.norm_media(media), self.norm_latents(latents)
        q, _ = self.linear_q(lat)
        kv, _ = self.linear_kv(torch.cat([x, lat], dim=1))
        k, v = kv.chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), attn_mask=keep)
        out, _ = self.linear_proj(out.transpose(1, 2).flatten(2))
        latents = latents + out
        h, _ = self.linear_fc1(self.norm_ff(latents))
        h, _ = self.linear_fc2(F.gelu(h))
        return latents + h


class PerceiverResampler(MegatronModule):
    def __init__(self, cfg: ResamplerConfig, dim: int, transformer_config):
        super().__init__(transformer_config)
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.latents, dim, dtype=transformer_config.params_dtype))
        # one learned vector added to every ESM state (the released code's media_pos_emb, of which one row is used);
        # latents and this start from randn as there (biases, which megatron zeroes, are the one difference)
        self.media_pos = nn.Parameter(torch.randn(dim, dtype=transformer_config.params_dtype))
        self.layers = nn.ModuleList(ResamplerLayer(cfg, dim, transformer_config) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        norms_in(self, transformer_config.params_dtype)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states [b, lp, dim] with mask [b, lp] (True: a residue to read) -> latents [b, n, dim]."""
        b = states.shape[0]
        media = states + self.media_pos
        latents = self.latents.unsqueeze(0).expand(b, -1, -1)
        keep = torch.cat([mask.bool(), mask.new_ones(b, latents.shape[1], dtype=torch.bool)], dim=1)
        keep = keep[:, None, None, :]
        for layer in self.layers:
            latents = layer(media, latents, keep)
        return self.norm(latents)


class MLP2xGelu(MegatronModule):
    """LLaVA's `mlp2x_gelu`: Linear(in -> out), GELU, Linear(out -> out), biases, no normalisation."""

    def __init__(self, n_in: int, n_out: int, transformer_config):
        super().__init__(transformer_config)
        self.linear_fc1 = _column(n_in, n_out, transformer_config, bias=True)
        self.linear_fc2 = _row(n_out, n_out, transformer_config, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        y, _ = self.linear_fc2(F.gelu(h))
        return y


def residues_only(mask: torch.Tensor) -> torch.Tensor:
    """The ESM mask without <cls> (first) and <eos> (last kept position) of each protein: Protein2Text reads
    the residue states only."""
    out = mask.clone().bool()
    out[:, 0] = False
    last = mask.long().sum(1) - 1
    out[torch.arange(mask.shape[0], device=mask.device), last] = False
    return out


class ResamplerConnector(MegatronModule):
    """ESM states -> cfg.latents vectors at the LLM width, every one of them real (mask all True)."""

    def __init__(self, cfg: ResamplerConfig, esm_dim: int, llm_dim: int, transformer_config):
        super().__init__(transformer_config)
        self.resampler = PerceiverResampler(cfg, esm_dim, transformer_config)
        self.mlp = MLP2xGelu(esm_dim, llm_dim, transformer_config)

    def forward(self, states: torch.Tensor, mask: torch.Tensor):
        lat = self.resampler(states, residues_only(mask))
        return self.mlp(lat), torch.ones(lat.shape[:2], dtype=torch.bool, device=lat.device)
