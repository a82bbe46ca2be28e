"""PaddedAttention (the encoders' core attention): megatron-core's unfused attention's results, without keeping its
[b, heads, L, L] tensors; the structure bias folded with the padding once, aligned for the GPU kernel; proteins
without padding (segment ids) as the padded batch."""
import pytest
import torch

from megatron_p2t.transformer.padded_attention import MASK_ALIGNMENT, PaddedAttention, additive_bias


def _config(heads=4, d=8, dropout=0.0):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, kv_channels=d,
                             attention_dropout=dropout, use_cpu_initialization=True)


def _modules(cfg):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    return (PaddedAttention(cfg, 1, AttnMaskType.padding, "self"),
            DotProductAttention(cfg, 1, AttnMaskType.padding, "self"))


def _batch(s=13, b=3, heads=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(s, b, heads, d, generator=g).requires_grad_() for _ in range(3)]
    lengths = torch.tensor([s, s - 5, 4])
    pad = torch.arange(s)[None, :] >= lengths[:, None]          # True = padding, as megatron's mask
    return qkv, pad[:, None, None, :]


def _kept(fn):
    """(output, shapes of what autograd saved for backward)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def test_equals_megatrons_unfused_attention_and_keeps_no_score_matrix(single):
    """Output and q/k/v gradients equal megatron-core's DotProductAttention (the module it replaces) over the same
    padding mask, padded query rows included; megatron keeps two [b, heads, s, s] tensors per layer, SDPA none."""
    s, b, heads = 13, 3, 4
    ours, theirs = _modules(_config(heads))
    (q, k, v), mask = _batch(s, b, heads)
    w = torch.randn(s, b, heads * 8, generator=torch.Generator().manual_seed(1))
    results = []
    for m in (ours, theirs):
        out, kept = _kept(lambda: m(q, k, v, mask))
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        results.append((out, grads, kept))
    (out, grads, kept), (ref, ref_grads, ref_kept) = results
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    square = lambda shapes: [t for t in shapes if t[-2:] == (s, s)]
    assert len(square(ref_kept)) >= 2 and square(kept) == [], (ref_kept, kept)


def test_a_bias_is_folded_with_the_padding_once_and_aligned():
    """SEPIT's distance bias: added to the scaled scores, padded keys excluded; gradients reach the bias; the folded
    tensor's rows sit at a stride the GPU kernel takes as it is (a multiple of 8), so it is not copied per layer."""
    s, b, heads, d = 13, 3, 4, 8
    ours = PaddedAttention(_config(heads), 1, None, "self")
    (q, k, v), mask = _batch(s, b, heads, d)
    bias = torch.randn(b, heads, s, s, generator=torch.Generator().manual_seed(2)).requires_grad_()
    folded = additive_bias(bias, mask)
    assert folded.shape == bias.shape and folded.stride(-2) % MASK_ALIGNMENT == 0 and folded.stride(-1) == 1
    out = ours(q, k, v, mask, attention_bias=folded)

    qh, kh, vh = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / d ** 0.5 + bias
    ref = (scores.masked_fill(mask, float("-inf")).softmax(-1) @ vh).permute(2, 0, 1, 3).reshape(s, b, -1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * w).sum(), (bias, q))
    want = torch.autograd.grad((ref * w).sum(), (bias, q))
    for g, rg in zip(got, want):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    assert float(got[0][1][..., s - 5:].abs().max()) == 0.0       # padded keys take no part


def test_a_zero_bias_changes_nothing_bit_for_bit():
    """A protein without coordinates in a batch with others gets a bias of zeros: its rows equal the unbiased
    path's exactly (the structure encoder's promise that such a protein is encoded as by plain ESM-2)."""
    s, b, heads = 13, 3, 4
    m = PaddedAttention(_config(heads), 1, None, "self")
    (q, k, v), mask = _batch(s, b, heads)
    bias = torch.zeros(b, heads, s, s)
    bias[0] = torch.randn(heads, s, s)
    with torch.no_grad():
        plain, biased = m(q, k, v, mask), m(q, k, v, mask, attention_bias=additive_bias(bias, mask))
    assert torch.equal(plain[:, 1:], biased[:, 1:]) and not torch.equal(plain[:, 0], biased[:, 0])


def test_segment_ids_attend_within_each_protein_as_the_padded_batch():
    """The proteins back to back without padding, segment ids as the mask (how models/esm.py runs a padded
    batch): every real token's output and the q/k/v gradients equal the padded batch's; a bias is refused there."""
    s, b, heads = 13, 3, 4
    m = PaddedAttention(_config(heads), 1, None, "self")
    (q, k, v), mask = _batch(s, b, heads)
    keep = (~mask[:, 0, 0, :]).flatten().nonzero().squeeze(1)
    seg = torch.arange(1, b + 1).repeat_interleave(s)[keep].unsqueeze(0)

    def pack(x):                                   # [s, b, ...] -> [T, 1, ...], protein after protein
        return x.transpose(0, 1).reshape(b * s, *x.shape[2:])[keep].unsqueeze(1)
    packed = m(pack(q), pack(k), pack(v), seg)[:, 0]
    padded = pack(m(q, k, v, mask))[:, 0]
    assert packed.shape == (int(keep.numel()), heads * 8)
    torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-6)
    w = torch.randn(packed.shape, generator=torch.Generator().manual_seed(4))
    for g, rg in zip(torch.autograd.grad((packed * w).sum(), (q, k, v)),
                     torch.autograd.grad((padded * w).sum(), (q, k, v))):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="padded batch"):
        m(pack(q), pack(k), pack(v), seg, attention_bias=torch.zeros(1, heads, keep.numel(), keep.numel()))


def test_attention_dropout_draws_from_the_tensor_parallel_generator(single):
    """Attention dropout in training runs under megatron's model-parallel RNG (as its unfused attention does): the
    same tracker seed gives the same output, and evaluation none."""
    from megatron.core import tensor_parallel
    m = PaddedAttention(_config(dropout=0.5), 1, None, "self")
    (q, k, v), mask = _batch()
    with torch.no_grad():
        m.eval()
        plain = m(q, k, v, mask)
        m.train()
        runs = []
        for _ in range(2):
            tensor_parallel.model_parallel_cuda_manual_seed(7)
            runs.append(m(q, k, v, mask))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], plain)


def test_layer_scaling_is_refused():
    cfg = _config()
    cfg.apply_query_key_layer_scaling = True
    with pytest.raises(ValueError, match="apply_query_key_layer_scaling"):
        PaddedAttention(cfg, 1, None, "self")
