"""The structure warm-up's model (SEPIT's first stage): the structure-aware encoder read three ways at once --
pooled states against a frozen text encoder's (contrastive), masked residues predicted by ESM-2's own LM head,
and the noise added to the coordinates predicted from the final states (models/esm_structure.DenoisingHead)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_p2t.models.esm_structure import DenoisingHead, StructureESMEncoder


class ESMLMHead(nn.Module):
    """ESM-2's masked-LM head (HF EsmLMHead): dense, GELU, LayerNorm, then the word embeddings' transpose + bias.
    Replicated on tensor-parallel ranks (33 outputs)."""

    def __init__(self, hidden: int, vocab: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, dtype=dtype)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(vocab, dtype=dtype))

    def forward(self, states, word_embeddings):
        return F.linear(self.layer_norm(F.gelu(self.dense(states))), word_embeddings) + self.bias


class WarmupModel(MegatronModule):
    def __init__(self, encoder: StructureESMEncoder, text_encoder, text_hidden: int, dim: int,
                 params_dtype=torch.float32):
        super().__init__(encoder.config)
        cfg = encoder.cfg
        self.esm = encoder
        self.lm_head = ESMLMHead(cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps, params_dtype)
        self.denoise = DenoisingHead(cfg.hidden_size, cfg.num_attention_heads, params_dtype)
        self.protein_proj = nn.Linear(cfg.hidden_size, dim, dtype=params_dtype)
        self.text_proj = nn.Linear(text_hidden, dim, dtype=params_dtype)
        # frozen, and not a registered submodule: not in checkpoints, optimizer or DeepSpeed's parameter walk
        object.__setattr__(self, "text_encoder", text_encoder)
        for m in (self.protein_proj, self.text_proj):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)

    def text_vectors(self, ids, mask):
        with torch.no_grad():
            h = self.text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.text_proj(pooled.to(self.text_proj.weight.dtype))

    def forward(self, batch):
        """(protein vectors [b, dim], text vectors [b, dim], MLM logits [b, s, vocab], predicted noise [b, s, 3])
        for a batch whose `masked_ids` and `noisy_coords` the step made."""
        states = self.esm(batch["masked_ids"], batch["protein_mask"], batch["noisy_coords"], batch["coords_mask"])
        m = batch["protein_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1)
        logits = self.lm_head(states, self.esm.word_embeddings.weight)
        noise = self.denoise(states, batch["noisy_coords"], batch["coords_mask"].bool() & batch["protein_mask"].bool())
        return self.protein_proj(pooled), self.text_vectors(batch["text_in"], batch["text_in_mask"]), logits, noise
