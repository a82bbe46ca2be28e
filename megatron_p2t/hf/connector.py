"""The exported connectors in plain torch, what `export` writes and `hf_model` reads back: Prot2Text-V2's projector
(projector/: fc1/fc2 + config.json), and a Protein2Text-style connector (connector/) under the released module
names (`mm_resampler`: Flamingo's PerceiverResampler, `mm_projector`: LLaVA's mlp2x_gelu), so the tensors also
drop into the released code.

Unlike the released code, which runs the resampler on one protein at a time, a batch of proteins of different
lengths runs at once: padded positions are masked out of the attention keys.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from megatron_p2t.checkpoint.resampler_hf import CONFIG_TYPE
from megatron_p2t.models.parts_config import ResamplerConfig

_ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class Projector(nn.Module):
    """Prot2Text-V2's projector: fc1 -> act -> dropout -> fc2 -> act -> dropout -> per-token L2 normalisation."""

    def __init__(self, input_dim: int, intermediate_dim: int, output_dim: int, activation: str = "gelu",
                 dropout: float = 0.0, l2_normalize: bool = True, **_):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(input_dim, intermediate_dim), nn.Linear(intermediate_dim, output_dim)
        self.act, self.dropout, self.l2 = _ACTS[activation], nn.Dropout(dropout), l2_normalize

    def forward(self, x):
        y = self.dropout(self.act(self.fc2(self.dropout(self.act(self.fc1(x))))))
        return F.normalize(y, p=2, dim=-1) if self.l2 else y

    @classmethod
    def from_pretrained(cls, path: str) -> "Projector":
        """An export's projector/ (config.json + model.safetensors)."""
        cfg = json.load(open(os.path.join(path, "config.json")))
        m = cls(**{k: v for k, v in cfg.items() if k != "model_type"})
        m.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        return m


class _Attention(nn.Module):
    def __init__(self, dim: int, cfg: ResamplerConfig):
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads = cfg.heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents, keep):             # [b, lp, d], [b, n, d], keep [b, 1, 1, lp + n]
        x, lat = self.norm_media(media), self.norm_latents(latents)
        heads = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.to_kv(torch.cat([x, lat], 1)).chunk(2, -1)
        out = F.scaled_dot_product_attention(heads(self.to_q(lat)), heads(k), heads(v), attn_mask=keep)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, cfg: ResamplerConfig, pos_rows: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(cfg.latents, dim))
        self.media_pos_emb = nn.Parameter(torch.zeros(pos_rows, 1, dim))   # the released shape; row 0 is used
        self.layers = nn.ModuleList(nn.ModuleList([
            _Attention(dim, cfg),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * cfg.ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * cfg.ff_mult, dim, bias=False))]) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, states: torch.Tensor, residues: torch.Tensor) -> torch.Tensor:
        b = states.shape[0]
        media = states + self.media_pos_emb[0]
        latents = self.latents.unsqueeze(0).expand(b, -1, -1)
        keep = torch.cat([residues.bool(), residues.new_ones(b, latents.shape[1], dtype=torch.bool)], 1)
        keep = keep[:, None, None, :]
        for attn, ff in self.layers:
            latents = attn(media, latents, keep) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class Connector(nn.Module):
    """ESM states [b, L+2, esm] and their mask -> (prompt vectors [b, n, llm], mask [b, n]: the real ones).
    With `resampler` settings, Protein2Text's resampler then mlp2x_gelu; without, LLaVA's mlp2x_gelu alone. `kind`
    is the connector's name (config.json's `connector`), kept for what reads it."""

    def __init__(self, kind: str, esm_dim: int, llm_dim: int, resampler: ResamplerConfig | None = None):
        super().__init__()
        self.kind = kind
        if resampler is not None:
            self.mm_resampler = PerceiverResampler(esm_dim, resampler, llm_dim)
        self.mm_projector = nn.Sequential(nn.Linear(esm_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, states: torch.Tensor, mask: torch.Tensor):
        if not hasattr(self, "mm_resampler"):                # mlp2x_gelu: one vector per ESM token
            return self.mm_projector(states), mask.bool()
        residues = mask.clone().bool()                       # without <cls> and <eos>, as Protein2Text reads them
        residues[:, 0] = False
        residues[torch.arange(mask.shape[0], device=mask.device), mask.long().sum(1) - 1] = False
        lat = self.mm_projector(self.mm_resampler(states, residues))
        return lat, torch.ones(lat.shape[:2], dtype=torch.bool, device=lat.device)

    @classmethod
    def from_pretrained(cls, path: str) -> "Connector":
        cfg = json.load(open(os.path.join(path, "config.json")))
        if cfg.get("model_type") != CONFIG_TYPE:
            raise ValueError(f"{path}/config.json: model_type {cfg.get('model_type')!r}, expected {CONFIG_TYPE!r}")
        res = ResamplerConfig(**cfg["resampler"]) if "resampler" in cfg else None
        m = cls(cfg["connector"], cfg["esm_dim"], cfg["llm_dim"], res)
        sd = {k[len("model."):]: v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: the tensors do not fit config.json: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return m

