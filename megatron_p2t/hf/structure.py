"""The structure-aware encoder of an export, with transformers + torch alone: HF's EsmModel (esm/) plus the
distance bias (structure/, written by checkpoint/esm_structure_hf.py), which becomes EsmModel's additive
attention mask and a term on its embeddings -- what models/esm_structure.py computes inside megatron-core."""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn


class DistanceBias(nn.Module):
    def __init__(self, kernels: int, heads: int, hidden: int, embed_scale: float, chunk: int = 128, **_):
        super().__init__()
        self.means, self.stds = nn.Parameter(torch.zeros(kernels)), nn.Parameter(torch.ones(kernels))
        self.fc1, self.heads = nn.Linear(kernels, kernels), nn.Linear(kernels, heads)
        self.embed = nn.Linear(kernels, hidden)
        self.embed_scale, self.chunk = embed_scale, chunk

    @classmethod
    def from_pretrained(cls, path: str, hidden: int) -> "DistanceBias":
        from safetensors.torch import load_file
        cfg = json.load(open(os.path.join(path, "config.json")))
        m = cls(hidden=hidden, **cfg)
        m.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        return m

    def forward(self, coords: torch.Tensor, known: torch.Tensor):
        """coords [b, s, 3], known [b, s] -> (bias [b, heads, s, s], embedding term [b, s, hidden])."""
        known = known.bool()
        coords = coords.float().masked_fill(~known.unsqueeze(-1), 0.0)
        std = self.stds.float().abs() + 1e-5
        biases, feats = [], []
        for a in range(0, coords.shape[1], self.chunk):         # [rows, s, kernels] at a time
            pair = (known[:, a:a + self.chunk, None] & known[:, None, :]).unsqueeze(-1)
            d = torch.cdist(coords[:, a:a + self.chunk], coords)
            phi = torch.exp(-0.5 * ((d.unsqueeze(-1) - self.means.float()) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
            phi = phi * pair
            w = self.fc1.weight.dtype
            biases.append(self.heads(F.gelu(self.fc1(phi.to(w)))) * pair)
            feats.append(phi.sum(2))
        bias = torch.cat(biases, 1).permute(0, 3, 1, 2)
        extra = self.embed(torch.cat(feats, 1).to(self.embed.weight.dtype)) * self.embed_scale
        return bias, extra * known.unsqueeze(-1)


def run_esm(esm, bias: DistanceBias, ids: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor,
            known: torch.Tensor) -> torch.Tensor:
    """EsmModel's last hidden states with the distance bias (a batch without coordinates: EsmModel as it is)."""
    known = known.bool() & mask.bool()
    if not bool(known.any()):
        return esm(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    b, extra = bias(coords, known)
    emb = esm.embeddings(input_ids=ids, attention_mask=mask.long()) + extra.to(esm.dtype)
    additive = b.to(emb.dtype) + (~mask.bool())[:, None, None, :].to(emb.dtype) * torch.finfo(emb.dtype).min
    rope = esm.rotary_embeddings(emb, torch.arange(ids.shape[1], device=ids.device)[None])
    return esm.encoder(emb, attention_mask=additive, position_embeddings=rope).last_hidden_state
