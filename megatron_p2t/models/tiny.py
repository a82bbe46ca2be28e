"""Tiny random HF checkpoints (EsmForMaskedLM, LlamaForCausalLM) saved with save_pretrained: for demos on a
CPU and for tests, which exercise the real loading code on them. Real runs name the public checkpoints."""
from __future__ import annotations

import os

import torch

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def make_llama(path: str, vocab: int = 256, layers: int = 4, hidden: int = 64, seed: int = 0,
               max_shard_size: str = "100KB", init_std: float = 0.02) -> str:
    """init_std: HF's initializer_range. A random 64-wide model with the default 0.02 cannot make a confident
    prediction (its logits are bounded by |h| * |w| ~ 8 * 0.16), so learnability checks use a larger one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072,
                      rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE), tie_word_embeddings=False,
                      rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    if init_std != 0.02:  # transformers' own init keeps 0.02 whatever initializer_range says
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, init_std)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def make_esm(path: str, layers: int = 3, hidden: int = 48, seed: int = 1, init_std: float = 0.02) -> str:
    """init_std: as make_llama's. At HF's 0.02 the layer -2 states (before the final LayerNorm, where Protein2Text
    reads) have norm ~0.2, and the resampler's randn position row added to them (norm ~7 at width 48) drowns the
    protein; at 0.1 they have norm ~6, at 0.25 ~42 (measured on SwissProt-like lengths)."""
    from transformers import EsmConfig, EsmForMaskedLM
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=33, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=2 * hidden, position_embedding_type="rotary", token_dropout=True,
                    emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, max_position_embeddings=1026)
    model = EsmForMaskedLM(cfg)
    if init_std != 0.02:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, init_std)
    model.save_pretrained(path)
    return path


def make_projector(path: str, esm_hidden: int = 48, inter: int = 32, out: int = 64, seed: int = 2) -> str:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    t = {"fc1.weight": torch.randn(inter, esm_hidden, generator=g) * 0.2,
         "fc1.bias": torch.randn(inter, generator=g) * 0.1,
         "fc2.weight": torch.randn(out, inter, generator=g) * 0.2, "fc2.bias": torch.randn(out, generator=g) * 0.1}
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def make_all(root: str, vocab: int = 256) -> dict:
    return {"llama": make_llama(os.path.join(root, "llama"), vocab=vocab), "esm": make_esm(os.path.join(root, "esm")),
            "projector": make_projector(os.path.join(root, "projector"))}

