"""SegmentAttention: packed rows attend within each sample, exactly as the samples alone would."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_p2t.transformer import attention


def _module(heads=4, groups=2, d=8, kernel="auto", scale=None, causal=True):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=d, use_cpu_initialization=True)
    return attention.SegmentAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=scale, kernel=kernel,
                                      causal=causal).eval()


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
    monkeypatch.setattr(attention, "varlen_kernels", lambda query, p: {"flash_attn": varlen})
    got = m(q, k, v, seg)
    assert calls == {"cu": [0, 5, 8, 12, 19, 21], "max": 7}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_packing_is_worked_out_once_per_segment_tensor():
    """Every layer gets the same mask tensor: its varlen bookkeeping (host syncs) is reused until it changes."""
    seg = _packed_case()[1].clone()                                    # unwritten, as the tensor of ones below
    first = attention.packing(seg)
    assert first.cu.tolist() == [0, 5, 8, 12, 19, 21] and first.max_len == 7 and first.cu.dtype == torch.int32
    assert first.bounds == (0, 5, 8, 12, 19, 21)
    # token t of row r sits at t * b + r in megatron's [s, b] order
    assert first.keep.tolist() == [t * 2 for t in range(12)] + [t * 2 + 1 for t in range(9)]
    assert attention.packing(seg) is first
    other = attention.packing(torch.ones_like(seg))                    # another tensor of that shape: its own
    assert other.cu.tolist() == [0, 12, 24] and other.keep.tolist() == [t * 2 + r for r in (0, 1) for t in range(12)]
    assert attention.packing(seg) is first and attention.packing(seg.detach()) is first    # a view: the same one
    seg[1, 9] = 2                                                  # in place: a padding token joins the last sample
    again = attention.packing(seg)
    assert again.cu.tolist() == [0, 5, 8, 12, 19, 22] and again.max_len == 7


def test_sdpa_per_sample_reads_the_memoised_packing(monkeypatch):
    """SDPA per sample (the CPU's path, and a GPU's without a varlen kernel) takes its sample bounds from the packing
    worked out once per mask tensor: no layer after the first stops the host (it cost a sync per row and layer)."""
    worked_out, real = [], attention.Packing
    monkeypatch.setattr(attention, "Packing", lambda *fields: worked_out.append(1) or real(*fields))
    m = _module(kernel="sdpa")
    lens, seg = _packed_case()
    q, k, v = _qkv(12, 2)
    first, second = m(q, k, v, seg), m(q, k, v, seg)
    assert worked_out == [1] and torch.equal(first, second)


def test_a_megatron_style_boolean_mask_is_refused():
    m = _module()
    q, k, v = _qkv(4, 1)
    with pytest.raises(ValueError, match="segment ids"):
        m(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))


def _per_segment(q, k, v, cu, causal, scale):
    """Reference varlen attention: SDPA on each [cu[i], cu[i+1]) span, query heads grouped over the kv heads."""
    rep, outs = q.shape[1] // k.shape[1], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (x[a:b].transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def spy_varlen(monkeypatch):
    """Packed rows through a reference varlen kernel (SDPA per segment) on the CPU; returns the lists its calls
    and the bookkeeping's workings-out (attention.Packing) append to."""
    kernel_calls, worked_out = [], []
    real_packing = attention.Packing

    def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        kernel_calls.append(max_q)
        return _per_segment(q, k, v, cu_q, causal, softmax_scale)

    def counted(*fields):
        worked_out.append(1)
        return real_packing(*fields)

    monkeypatch.setattr(attention, "varlen_kernels", lambda query, p: {"flash_attn": reference_kernel})
    monkeypatch.setattr(attention, "Packing", counted)
    return kernel_calls, worked_out


def varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert key.shape[1] == query.shape[1], "no GQA in this release"
    return _per_segment(query, key, value, cu_seq_q, is_causal, None)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    # 2.11 too (its torch/nn/attention/varlen.py, read from the 2.11.0 wheel; the GPU machine's torch)
    assert key.shape[1] == query.shape[1], "no GQA in this release"
    return _per_segment(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa or key.shape[1] == query.shape[1], "GQA needs enable_gqa"
    return _per_segment(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


@pytest.mark.parametrize("release", [varlen_2_9, varlen_2_10, varlen_2_12], ids=["2.9", "2.10-2.11", "2.12"])
@pytest.mark.parametrize("scale", [None, 0.2], ids=["default-scale", "scale-0.2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_torch_varlen_follows_each_releases_signature(monkeypatch, release, scale, causal):
    """PyTorch's varlen_attn changed its arguments between releases (causality, scale, GQA); model.attention_kernel=
    torch_varlen gives what SDPA per sample gives with each, here against each signature's documented meaning,
    causal (the decoder) and bidirectional (ESM's unpadded proteins)."""
    try:
        import torch.nn.attention.varlen as torch_varlen
    except ImportError:                 # PyTorch before 2.9: the forms are checked through a stand-in module
        torch_varlen = types.ModuleType("torch.nn.attention.varlen")
        monkeypatch.setitem(sys.modules, torch_varlen.__name__, torch_varlen)
    lens, seg = _packed_case()
    q, k, v = _qkv(12, 2)
    want = _module(kernel="sdpa", scale=scale, causal=causal)(q, k, v, seg)
    monkeypatch.setattr(torch_varlen, "varlen_attn", release, raising=False)
    monkeypatch.setattr(attention, "varlen_kernels", lambda query, p: {"torch_varlen": attention._torch_varlen})
    got = _module(kernel="torch_varlen", scale=scale, causal=causal)(q, k, v, seg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_installed_torch_takes_the_arguments_its_varlen_kernel_is_given():
    """The real torch.nn.attention.varlen on meta tensors (its shape-only kernel): this PyTorch accepts what
    _torch_varlen passes, GQA and a scale included, forward and backward. A PyTorch without it (before 2.9) is
    never offered it."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        assert attention._torch_varlen_runs_on(0) is False
        return
    q = torch.empty(12, 4, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k = torch.empty(12, 2, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    v = torch.empty(12, 2, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device="meta")
    out = attention._torch_varlen(q, k, v, cu, cu, 7, 7, 0.0, 0.2, True)
    assert out.shape == (12, 4, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_a_kernel_that_cannot_run_here_is_refused_by_name():
    lens, seg = _packed_case()
    q, k, v = _qkv(12, 2)
    with pytest.raises(ValueError, match=r"model.attention_kernel=flash_attn cannot run on this cpu float32 tensor"):
        _module(kernel="flash_attn")(q, k, v, seg)
    with pytest.raises(ValueError, match="torch_varlen.*no attention dropout"):
        m = _module(kernel="torch_varlen")
        m.dropout = 0.1
        m.train()(q, k, v, seg)
    with pytest.raises(ValueError, match="attention kernel 'xformers'"):
        _module(kernel="xformers")
    # auto and sdpa run on the CPU, and rows without segments take SDPA whatever the kernel
    torch.testing.assert_close(_module(kernel="auto")(q, k, v, seg), _module(kernel="sdpa")(q, k, v, seg))
    torch.testing.assert_close(_module(kernel="flash_attn")(q, k, v, None), _module()(q, k, v, None))
