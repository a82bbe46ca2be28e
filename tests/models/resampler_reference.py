"""Protein2Text's connector as released, in plain torch and written here as the reference: Flamingo's
PerceiverResampler (PerceiverAttention over [media; latents], LayerNorm-ed feed-forward, final LayerNorm, the
first row of media_pos_emb added to the media) and LLaVA's mlp2x_gelu, run on one protein at a time as the
released code does. Module names give the released state-dict names (model.mm_resampler.*, model.mm_projector.*)."""
import torch
from torch import nn


class PerceiverAttention(nn.Module):
    def __init__(self, dim, head_dim, heads):
        super().__init__()
        self.heads, self.scale = heads, head_dim ** -0.5
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, head_dim * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * head_dim * heads, bias=False)
        self.to_out = nn.Linear(head_dim * heads, dim, bias=False)

    def forward(self, x, latents):                       # x [n_media, dim], latents [n, dim]
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], 0)).chunk(2, -1)
        q, k, v = (t.reshape(t.shape[0], self.heads, -1).transpose(0, 1) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)
        attn = (sim - sim.amax(-1, keepdim=True).detach()).softmax(-1)
        return self.to_out((attn @ v).transpose(0, 1).reshape(latents.shape[0], -1))


class PerceiverResampler(nn.Module):
    def __init__(self, dim, depth, head_dim, heads, latents, pos_rows, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, dim))
        self.media_pos_emb = nn.Parameter(torch.randn(pos_rows, 1, dim))
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, head_dim, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False))]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):                                # one protein's residue states [L, dim]
        x = x + self.media_pos_emb[0]
        latents = self.latents
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class Connector(nn.Module):
    def __init__(self, esm_dim, llm_dim, depth=2, head_dim=8, heads=4, latents=6, ff_mult=2):
        super().__init__()
        self.mm_resampler = PerceiverResampler(esm_dim, depth, head_dim, heads, latents, llm_dim, ff_mult)
        self.mm_projector = nn.Sequential(nn.Linear(esm_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        with torch.no_grad():                            # LayerNorms away from 1 / 0 so their mapping is tested
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0.0, 0.2)

    def forward(self, residues):                         # [L, esm_dim] -> [latents, llm_dim]
        return self.mm_projector(self.mm_resampler(residues))

    def released_state_dict(self):
        return {f"model.{k}": v for k, v in self.state_dict().items()}
