"""Configs derived from HF configs, and the public model sizes."""
import pytest
import torch
from transformers import LlamaConfig

from megatron_p2t.models import llama
from megatron_p2t.models.esm import ESM2_SIZES


def llama31_8b():
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def test_llama31_8b_settings():
    cfg = llama.transformer_config(llama31_8b())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == \
        (32, 4096, 8, 128, 14336)
    assert cfg.gated_linear_unit and not cfg.add_bias_linear and cfg.normalization == "RMSNorm"
    assert llama.rope_settings(llama31_8b()) == {"rotary_base": 500000, "rope_scaling": True,
                                                  "rope_scaling_factor": 8.0}


def test_unsupported_rope_scaling_is_refused():
    c = llama31_8b()
    c.rope_scaling = dict(c.rope_scaling, high_freq_factor=2.0)
    with pytest.raises(ValueError, match="high_freq_factor"):
        llama.rope_settings(c)
    c.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        llama.rope_settings(c)


def test_esm2_public_sizes():
    params = {k: c.num_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.ffn_hidden_size)
              for k, c in ESM2_SIZES.items()}
    # the names are the published parameter counts, within the embedding/bias/norm remainder
    for name, n in params.items():
        target = float(name[:-1]) * (1e9 if name.endswith("B") else 1e6)
        assert 0.8 * target < n < 1.15 * target, (name, n)



@pytest.mark.parametrize("decoder", ["llama", "llama_moe"])
def test_model_attention_kernel_reaches_every_decoder_layer(single, decoder):
    from megatron_p2t.config import load_config
    from megatron_p2t.parts.assemble import build
    from megatron_p2t.transformer.attention import SegmentAttention
    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg = load_config(None, ["model.encoder=none", "model.connector=none", "instruct.template=plain",
                             f"model.decoder={decoder}", "model.attention_kernel=sdpa"])
    model = build(cfg.model, single, hf, None, None, placeholder_id=0)
    assert [m.kernel for m in model.modules() if isinstance(m, SegmentAttention)] == ["sdpa", "sdpa"]


def test_a_packed_forward_works_out_the_varlen_bookkeeping_once(single, monkeypatch):
    """Both decoder layers run packed rows through a varlen kernel (a reference one, on CPU) from one
    bookkeeping, and give what SDPA per sample gives."""
    from megatron_p2t.config import load_config
    from megatron_p2t.parts.assemble import build
    from tests.transformer.test_attention import spy_varlen
    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg = load_config(None, ["model.encoder=none", "model.connector=none", "instruct.template=plain"])
    model = build(cfg.model, single, hf, None, None, placeholder_id=0).eval()
    seg = torch.tensor([[1] * 5 + [2] * 3 + [0] * 4, [1] * 7 + [2] * 5])
    ids = torch.randint(1, 64, seg.shape, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        want = model(ids, pos, attention_mask=seg.clone())   # its own tensor: SDPA per sample memoises it too
    kernel_calls, worked_out = spy_varlen(monkeypatch)
    with torch.no_grad():
        got = model(ids, pos, attention_mask=seg)
    assert kernel_calls == [7, 7] and len(worked_out) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
