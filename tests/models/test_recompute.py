"""model.recompute: the decoder recomputed in backward gives the loss and gradients it gives keeping everything."""
import pytest
import torch
from transformers import LlamaConfig

HF = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
SEG = torch.tensor([[1] * 5 + [2] * 3 + [0] * 4, [1] * 7 + [2] * 5])       # two packed rows, one with padding


def _model(single, decoder: str, *overrides):
    """A decoder-only model with LoRA (dropout 0.1, in training mode) on a frozen decoder and embedding: megatron-
    core's reentrant recompute would give adapters behind a frozen input no gradient. Trainable weights random."""
    from megatron_p2t.config import load_config
    from megatron_p2t.models import llama_moe
    from megatron_p2t.parts.assemble import build
    from megatron_p2t.models.lora import apply_lora
    cfg = load_config(None, ["model.encoder=none", "model.connector=none", "instruct.template=plain",
                             f"model.decoder={decoder}", "model.moe.capacity_factor=1.0", *overrides])
    torch.manual_seed(0)
    model = build(cfg.model, single, HF, None, None, placeholder_id=0)
    apply_lora(model.llm, cfg.model.llm_lora, "llm")
    llama_moe.train_experts(model)
    return _randomized(model, 0.05).train()


def _randomized(module, std: float):
    """Every trainable weight drawn afresh (LoRA's B starts at zero, which would leave A without a gradient)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _step(model, seed: int = 3):
    """Loss, every trainable gradient by name, and (MoE) the routers' counts of one forward + backward."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_p2t.models import llama_moe
    ids = torch.randint(1, 64, SEG.shape, generator=torch.Generator().manual_seed(2))
    model_parallel_cuda_manual_seed(seed)                              # LoRA dropout's masks, forked or not
    loss = model(ids, torch.arange(12).expand(2, 12), attention_mask=SEG, labels=ids)[SEG > 0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    counts = [m.router.take_stats() for m in llama_moe.moe_layers(model)]
    return float(loss), grads, counts


@pytest.mark.parametrize("decoder,method,layers", [("llama", "uniform", 1), ("llama", "uniform", 2),
                                                   ("llama", "block", 3), ("llama_moe", "uniform", 1),
                                                   ("llama_moe", "uniform", 2)])
def test_recomputed_decoder_gives_the_same_loss_gradients_and_router_counts(single, decoder, method, layers):
    keep = _step(_model(single, decoder))
    again = _model(single, decoder, "model.recompute.granularity=full", f"model.recompute.method={method}",
                   f"model.recompute.num_layers={layers}")
    assert again.llm.decoder.config.recompute_granularity == "full"
    got = _step(again)
    assert got[0] == keep[0]
    assert got[1].keys() == keep[1].keys() and any(".lora_A" in n for n in got[1])
    for name, grad in keep[1].items():
        assert ".lora_" not in name or grad.abs().sum() > 0, name   # every adapter reached, the first layer's too
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)
    assert len(got[2]) == (4 if decoder == "llama_moe" else 0)
    for a, b in zip(got[2], keep[2]):                          # routing recomputed in backward is not counted twice
        assert torch.equal(a, b) and a[-2] == int((SEG > 0).sum())


def test_a_packed_step_works_out_its_varlen_bookkeeping_once_with_recompute(single, monkeypatch):
    """The recomputed chunks get a detached view of the segment tensor: the bookkeeping is still reused, and the
    step (a reference varlen kernel on CPU) gives what SDPA per sample gives with every activation kept."""
    from megatron_p2t.transformer import attention
    from tests.transformer.test_attention import spy_varlen
    keep = _step(_model(single, "llama"))
    model = _model(single, "llama", "model.recompute.granularity=full")
    kernel_calls, worked_out = spy_varlen(monkeypatch)
    attention._packings.clear()                # the kept step's SDPA per sample worked out the same batch's
    got = _step(model)
    assert len(kernel_calls) == 8 and len(worked_out) == 1     # 4 layers, forward and recomputed
    assert got[0] == pytest.approx(keep[0], rel=1e-6)
    for name, grad in keep[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_chunk_that_does_not_fit_the_stages_is_refused_by_name(single):
    from megatron_p2t.config import ConfigError, load_config
    from megatron_p2t.parallel.layout import LayoutError
    with pytest.raises(LayoutError, match=r"num_layers=3 does not divide the 4 decoder layers.*method=block"):
        _model(single, "llama", "model.recompute.granularity=full", "model.recompute.num_layers=3")
    with pytest.raises(LayoutError, match=r"num_layers=5 is more than the 4 decoder layers"):
        _model(single, "llama", "model.recompute.granularity=full", "model.recompute.method=block",
               "model.recompute.num_layers=5")
    with pytest.raises(ConfigError, match=r"model.recompute.granularity='selective'.*none, or full"):
        load_config(None, ["model.recompute.granularity=selective"])
    with pytest.raises(ConfigError, match=r"model.recompute.method='layers'"):
        load_config(None, ["model.recompute.method=layers"])
    # megatron-core 0.16.1 runs the layers block recompute keeps without the padding mask (MoE would route padding)
    with pytest.raises(ConfigError, match=r"method=block with model.decoder=llama_moe.*method=uniform"):
        load_config(None, ["model.decoder=llama_moe", "model.recompute.granularity=full",
                           "model.recompute.method=block"])


def _encoder(single, structure: bool, recompute: bool, lora: bool):
    """A tiny ESM-2 (or the structure-aware one) in training mode: ESM LoRA (dropout 0.1) and/or the distance bias
    trained, everything else frozen; trainable weights random, the same for both settings."""
    from megatron_p2t.models.esm import ESMConfig, ESMEncoder
    from megatron_p2t.models.esm_structure import StructureESMEncoder
    from megatron_p2t.models.lora import apply_lora
    from megatron_p2t.models.parts_config import LoRAConfig, StructureConfig
    cfg = ESMConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)
    torch.manual_seed(0)
    enc = (StructureESMEncoder(cfg, StructureConfig(kernels=8, chunk=4), recompute=recompute) if structure
           else ESMEncoder(cfg, recompute=recompute))
    enc.requires_grad_(False)
    if lora:
        apply_lora(enc, LoRAConfig(r=4, dropout=0.1), "esm")
    if structure:
        enc.structure.requires_grad_(True)
    return _randomized(enc, 0.1).train()


def _encoder_step(enc, structure: bool):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 24, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 7:] = False
    model_parallel_cuda_manual_seed(3)
    args = (torch.randn(2, 9, 3, generator=g) * 5, mask.clone()) if structure else ()
    out = enc(ids, mask, *args)
    (out[mask] ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("structure,lora", [(False, True), (True, False), (True, True)],
                         ids=["esm-lora", "distance-bias", "both"])
def test_a_recomputed_encoder_gives_the_same_states_and_gradients(single, monkeypatch, structure, lora):
    """model.recompute.encoder: ESM's stage-1 LoRA behind frozen embeddings (reentrant checkpoint: the input is
    made to need a gradient), and the structure-aware encoder's distance bias, which every layer reads (it goes
    into each layer's checkpoint as an input; closed over, the first layer's backward would free its graph)."""
    from megatron.core import tensor_parallel
    keep = _encoder_step(_encoder(single, structure, False, lora), structure)
    checkpointed, real = [], tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda *a: (checkpointed.append(1), real(*a))[1])
    again = _encoder_step(_encoder(single, structure, True, lora), structure)
    assert len(checkpointed) == 3                              # every layer
    torch.testing.assert_close(again[0], keep[0], rtol=0, atol=0)
    assert again[1].keys() == keep[1].keys() and keep[1]
    for name, grad in keep[1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(again[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("structure", [False, True], ids=["esm", "structure-without-coordinates"])
def test_an_encoder_no_gradient_runs_through_is_not_recomputed(single, monkeypatch, structure):
    """Stage 2 with ESM frozen; or the structure-aware encoder, its bias trained, given a batch without
    coordinates (it is plain ESM-2 then): no gradient runs through the layers, so nothing is checkpointed and the
    input is not made to need one (which would start a backward through every frozen layer for nothing)."""
    from megatron.core import tensor_parallel
    enc = _encoder(single, structure, True, lora=False)
    calls = []
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda *a: calls.append(1))
    out = enc(torch.randint(4, 24, (1, 5)), torch.ones(1, 5, dtype=torch.bool))
    assert not calls and not out.requires_grad
