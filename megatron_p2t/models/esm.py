"""ESM-2 as a megatron-core TransformerBlock.

Pre-LayerNorm layers with biases everywhere and an exact-GELU MLP, rotary position embeddings (base 10000,
rotate-half), bidirectional attention over a key padding mask (SDPA in megatron-core's core-attention slot,
transformer/padded_attention.py), the final `emb_layer_norm_after`, and ESM's token-dropout rescaling of the
embeddings. HF's ESM scales queries before applying rotary; rotary is a rotation, so scaling after it
(megatron's order) gives the same scores.

The 33-token embedding is replicated on tensor-parallel ranks rather than vocab-split (33 rows do not divide,
and it is 0.003% of the 3B model). The whole encoder lives on the first pipeline stage, as the vision encoder
does in megatron-core's LLaVA, so its config carries pipeline size 1.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_p2t.models.specs import cpu_friendly, encoder_layer_spec, norms_in, parallel_sizes
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.transformer.attention import repad, unpad
from megatron_p2t.transformer.padded_attention import additive_bias

MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM-2's masking ratio x mask-token share, fixed for every ESM-2 checkpoint


@dataclasses.dataclass
class ESMConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int = 33
    pad_token_id: int = 1
    mask_token_id: int = 32
    layer_norm_eps: float = 1e-5
    token_dropout: bool = True
    rotary_base: int = 10000
    max_position_embeddings: int = 1026

    @classmethod
    def from_hf(cls, hf) -> "ESMConfig":
        if getattr(hf, "position_embedding_type", "rotary") != "rotary" or getattr(hf, "emb_layer_norm_before", False):
            raise ValueError("only ESM-2 (rotary positions, no embedding LayerNorm before the layers) is supported")
        return cls(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                   num_attention_heads=hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
                   vocab_size=hf.vocab_size, pad_token_id=hf.pad_token_id, mask_token_id=hf.mask_token_id,
                   layer_norm_eps=hf.layer_norm_eps, token_dropout=hf.token_dropout,
                   max_position_embeddings=hf.max_position_embeddings)


# The public ESM-2 checkpoints (facebook/esm2_*), by parameter count.
ESM2_SIZES = {
    "8M": ESMConfig(6, 320, 20, 1280), "35M": ESMConfig(12, 480, 20, 1920),
    "150M": ESMConfig(30, 640, 20, 2560), "650M": ESMConfig(33, 1280, 20, 5120),
    "3B": ESMConfig(36, 2560, 40, 10240), "15B": ESMConfig(48, 5120, 40, 20480),
}


def transformer_config(cfg: ESMConfig, num_layers: int, params_dtype=torch.float32, layout: Layout | None = None,
                       **overrides):
    kw = dict(num_layers=num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
              ffn_hidden_size=cfg.ffn_hidden_size, normalization="LayerNorm", layernorm_epsilon=cfg.layer_norm_eps,
              add_bias_linear=True, add_qkv_bias=True, activation_func=F.gelu, gated_linear_unit=False,
              attention_dropout=0.0, hidden_dropout=0.0, params_dtype=params_dtype,
              bf16=params_dtype == torch.bfloat16, pipeline_dtype=params_dtype, **cpu_friendly())
    kw.update(parallel_sizes(layout))
    kw["pipeline_model_parallel_size"] = 1
    kw.update(overrides)
    return TransformerConfig(**kw)


class ESMEncoder(MegatronModule):
    """ids [b, s] + mask [b, s] (True = residue/special, False = padding) -> hidden states [b, s, h].

    `output_layer`: which of HF's `hidden_states` to return: -1 (default, Prot2Text-V2) is the last layer after
    the final LayerNorm; k in 0..num_layers-1 (or -2, ... as in Protein2Text) is the input to layer k, before
    any final LayerNorm. Only the layers needed are built.

    `unpad` (default): a batch with padding runs its real tokens only, the proteins back to back in one row, and
    attention within each protein by `attention_kernel` (model.attention_kernel); outputs at padding are zero.
    False runs the padded batch as it is (the structure encoder's distance bias needs it; tests compare the two).
    """

    def __init__(self, cfg: ESMConfig, output_layer: int = -1, params_dtype=torch.float32,
                 layout: Layout | None = None, recompute: bool = False, attention_kernel: str = "auto",
                 unpad: bool = True, **config_overrides):
        n = cfg.num_layers
        k = output_layer % (n + 1)
        super().__init__(transformer_config(cfg, k, params_dtype, layout, **config_overrides))
        self.cfg, self.final_norm = cfg, k == n
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id,
                                            dtype=params_dtype)
        self.rotary = RotaryEmbedding(kv_channels=self.config.kv_channels, rotary_percent=1.0,
                                      rotary_base=cfg.rotary_base, use_cpu_initialization=True)
        self.block = norms_in(TransformerBlock(self.config, encoder_layer_spec(attention_kernel=attention_kernel),
                                               post_layer_norm=self.final_norm), params_dtype)
        self.recompute, self.unpad = recompute, unpad      # recompute: model.recompute.encoder

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids)
        if self.cfg.token_dropout:
            masked = ids == self.cfg.mask_token_id
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).float() / mask.sum(-1)
            x = (x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[:, None, None]).to(x.dtype)
        return x * mask.unsqueeze(-1).to(x.dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids, mask)
        if self.unpad and not bool(mask.all()):
            return self.run_unpadded(x, mask)
        return self.run_block(x.transpose(0, 1).contiguous(), ids, mask)

    def run_unpadded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The layers over the real tokens of embeddings x [b, s, h] -> [b, s, h], zero at padding. The proteins
        go back to back in one row [T, 1, h] with segment ids 1..b, so no layer computes anything for padding (a
        length-bucketed batch is still ~30% padding); rotary positions restart at each protein, as in the padded
        batch."""
        b, s = mask.shape
        u = unpad(mask)
        rope = self.rotary(s).to(x.device)[u.pos]                                              # [T, 1, 1, d]
        y = self._layers(x.reshape(b * s, -1)[u.keep].unsqueeze(1), u.seg, rope, None)          # [T, 1, h]
        return repad(y.squeeze(1), u, b, s)

    def run_block(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layers over the padded embeddings x [s, b, h] -> [b, s, h]; attention_bias [b, heads, s, s] is added
        to every layer's attention scores (the structure encoder's)."""
        rope = self.rotary(ids.shape[1]).to(x.device)
        # megatron's padding mask: True where attention is NOT allowed, shaped [b, 1, 1, s]
        attn_mask = (~mask.bool())[:, None, None, :]
        if attention_bias is not None:   # the padding folded in once for every layer (transformer/padded_attention.py)
            attention_bias = additive_bias(attention_bias, attn_mask)
        return self._layers(x, attn_mask, rope, attention_bias).transpose(0, 1)

    def _layers(self, x, attn_mask, rope, bias):
        if self.recompute and self.training and torch.is_grad_enabled() and (
                x.requires_grad or (bias is not None and bias.requires_grad)
                or any(p.requires_grad for p in self.block.parameters())):   # a gradient runs through the layers
            return self._recomputed(x, attn_mask, rope, bias)
        kw = {} if bias is None else {"attention_bias": bias}
        return self.block(hidden_states=x, attention_mask=attn_mask, rotary_pos_emb=rope, **kw)

    def _recomputed(self, x, attn_mask, rope, bias):
        """The layers one by one through megatron-core's checkpoint, which keeps only each layer's input and replays
        the RNG tracker for the recompute. It is reentrant: the input must need a gradient for the adapters inside
        to get one, and the distance bias goes in as an input (megatron-core's own loop would close over it, and the
        first layer's backward would then run through the bias's graph and free it for the others)."""
        if not x.requires_grad:
            x = x.detach().requires_grad_()
        for layer in self.block.layers:
            def run(h, m, r, b, layer=layer):
                return layer(hidden_states=h, attention_mask=m, rotary_pos_emb=r, attention_bias=b)[0]
            x = tensor_parallel.checkpoint(run, False, x, attn_mask, rope, bias)
        return self.block.final_layernorm(x) if self.block.final_layernorm is not None else x
