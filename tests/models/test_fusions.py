"""model.fused_kernels: megatron-core's fused SwiGLU and bias-dropout-add in the decoder (parts/assemble.py)."""
import pytest
import torch


@pytest.mark.parametrize("decoder", ["llama", "llama_moe"])
def test_fused_kernels_compute_what_the_plain_decoder_does(single, dense, decoder, monkeypatch):
    """The fused kernels run in every layer (and every expert) only when asked, with the same logits and the
    gradients within rounding (the fused SwiGLU's backward is its own formula). torch.compile is disabled here:
    compiling the two kernels takes ~30 s on 2 cores; the functions it compiles run as written, and the GPU
    check (bench/gpu/check.py, section fusion) compiles them for real."""
    import torch._dynamo
    from megatron.core.fusions import fused_bias_dropout, fused_bias_swiglu
    from transformers import AutoConfig

    from megatron_p2t.config import ModelConfig
    from megatron_p2t.parts.assemble import build
    from megatron_p2t.models.parts_config import FreezeConfig
    calls = {"swiglu": 0, "bias_dropout_add": 0}

    def spy(owner, attr, key):
        real = getattr(owner, attr)

        def counted(*a, **kw):
            calls[key] += 1
            return real(*a, **kw)
        monkeypatch.setattr(owner, attr, counted)
    spy(fused_bias_swiglu.SwiGLUFunction, "apply", "swiglu")
    spy(fused_bias_swiglu.WeightedSwiGLUFunction, "apply", "swiglu")     # experts: scaled by their routing probs
    spy(fused_bias_dropout, "bias_dropout_add_fused_train", "bias_dropout_add")

    hf_cfg = AutoConfig.from_pretrained(dense)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 24), generator=g)
    pos = torch.arange(24).expand(2, -1)
    out, state = {}, None
    layers = hf_cfg.num_hidden_layers
    experts_used = layers if decoder == "llama" else layers * 2   # at least two experts per layer get tokens
    with torch._dynamo.config.patch(disable=True):
        for fused in (False, True):
            mc = ModelConfig(encoder="none", decoder=decoder, fused_kernels=fused, freeze=FreezeConfig(llm=False))
            model = build(mc, single, hf_cfg, None, None, placeholder_id=0).train()
            if state is None:
                state = model.state_dict()
            else:
                model.load_state_dict(state)
            before = dict(calls)
            logits = model(input_ids=ids, position_ids=pos, attention_mask=None)
            logits.float().logsumexp(-1).mean().backward()
            ran = {k: calls[k] - before[k] for k in calls}
            if fused:
                assert ran["swiglu"] >= experts_used and ran["bias_dropout_add"] == 2 * layers, ran
            else:
                assert ran == {"swiglu": 0, "bias_dropout_add": 0}, ran
            out[fused] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    assert out[True][1].keys() == out[False][1].keys()
    for n, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], grad, rtol=1e-4, atol=1e-6, msg=n)
