"""SegmentAttention: packed rows attend within each sample, exactly as the samples alone would."""
import pytest
import torch
import torch.nn.functional as F

from megatron_p2t.transformer import attention


def _module(heads=4, groups=2, d=8):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=d, use_cpu_initialization=True)
    return attention.SegmentAttention(cfg, 1, AttnMaskType.causal, "self").eval()


def _qkv(s, b, heads=4, groups=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, d, generator=g), torch.randn(s, b, groups, d, generator=g),
            torch.randn(s, b, groups, d, generator=g))


def _packed_case():
    lens = [[5, 3, 4], [7, 2]]          # two rows, 12 and 9 real tokens; row 1 has 3 padding tokens
    seg = torch.zeros(2, 12, dtype=torch.long)
    for r, row in enumerate(lens):
        pos = 0
        for i, n in enumerate(row):
            seg[r, pos:pos + n] = i + 1
            pos += n
    return lens, seg


def _each_alone(m, q, k, v, lens):
    """Every sample through the module on its own (plain causal), as [row][sample] outputs."""
    out = []
    for r, row in enumerate(lens):
        pos, res = 0, []
        for n in row:
            res.append(m(q[pos:pos + n, r:r + 1], k[pos:pos + n, r:r + 1], v[pos:pos + n, r:r + 1], None))
            pos += n
        out.append(res)
    return out


def test_packed_rows_equal_each_sample_alone_and_padding_is_zero():
    m = _module()
    lens, seg = _packed_case()
    q, k, v = _qkv(12, 2)
    packed = m(q, k, v, seg)
    assert packed.shape == (12, 2, 32) and torch.isfinite(packed).all() and (packed[9:, 1] == 0).all()
    for r, row in enumerate(lens):
        pos = 0
        for n, alone in zip(row, _each_alone(m, q, k, v, lens)[r]):
            torch.testing.assert_close(packed[pos:pos + n, r:r + 1], alone, rtol=1e-6, atol=1e-6)
            pos += n


def test_no_mask_is_plain_causal_attention_with_grouped_queries():
    m = _module()
    q, k, v = _qkv(6, 2)
    ref = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.repeat_interleave(2, 2).permute(1, 2, 0, 3),
                                         v.repeat_interleave(2, 2).permute(1, 2, 0, 3), is_causal=True)
    torch.testing.assert_close(m(q, k, v, None), ref.permute(2, 0, 1, 3).reshape(6, 2, 32))


def test_varlen_path_hands_the_kernel_contiguous_samples_and_scatters_back(monkeypatch):
    """The flash-attn branch's bookkeeping (token order, cu_seqlens, scatter), with a reference kernel."""
    calls = {}

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        calls.update(cu=cu_q.tolist(), max=max_q)
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            rep = q.shape[1] // k.shape[1]
            qq, kk, vv = q[a:b].transpose(0, 1), k[a:b].repeat_interleave(rep, 1).transpose(0, 1), \
                v[a:b].repeat_interleave(rep, 1).transpose(0, 1)
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=softmax_scale)
                        .transpose(0, 1))
        return torch.cat(outs)

    m = _module()
    lens, seg = _packed_case()
    q, k, v = _qkv(12, 2)
    want = m(q, k, v, seg)
    monkeypatch.setattr(attention, "_flash_varlen", lambda query: varlen)
    got = m(q, k, v, seg)
    assert calls == {"cu": [0, 5, 8, 12, 19, 21], "max": 7}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_megatron_style_boolean_mask_is_refused():
    m = _module()
    q, k, v = _qkv(4, 1)
    with pytest.raises(ValueError, match="segment ids"):
        m(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))
