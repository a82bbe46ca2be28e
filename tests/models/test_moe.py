"""The mixture-of-experts decoder (models/llama_moe.py, checkpoint/llama_moe_hf.py): upcycling equals the dense
model, the Qwen2-MoE export loads in transformers alone with equal logits, expert parallelism combined with tensor
and pipeline parallelism equals one process, and megatron checkpoints reshard across expert-parallel layouts."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

LAYOUTS = [(1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 1)]   # TP, PP, EP


def _moe_model(hf_cfg, moe, layout, path):
    from megatron_p2t.checkpoint import llama_moe_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.models import llama
    model = llama.build(hf_cfg, layout=layout, moe=moe)
    copy_into(model, llama_moe_hf.megatron_tensors(model, HFDir(path), hf_cfg, moe, 0, 1), path)
    return model


def test_upcycled_model_computes_the_dense_model_and_exports_to_qwen2_moe(dense, single, tmp_path):
    """Every expert a copy of the dense MLP, router near zero: the logits equal HF LlamaForCausalLM's; the export
    (Qwen2-MoE layout) loads with transformers alone and gives the megatron model's logits; reading the export
    back gives the same tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from megatron_p2t.checkpoint import export_hf, llama_moe_hf
    from megatron_p2t.models import llama_moe
    from megatron_p2t.models.parts_config import MoEConfig
    hf_cfg = AutoConfig.from_pretrained(dense)
    moe = MoEConfig()
    model = _moe_model(hf_cfg, moe, single, dense).eval()
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        ours = model(input_ids=ids, position_ids=pos, attention_mask=None)
        ref = LlamaForCausalLM.from_pretrained(dense).eval()(ids).logits
    assert (ours - ref).abs().max() <= 1e-5
    # training routes the same tokens over all experts (a zero router would send them all to expert 0)
    model.train()
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, attention_mask=None)
    stats = llama_moe.take_router_stats(model, single)
    for layer in range(1, 5):
        assert sum(stats[f"moe/layer{layer:02d}/expert{e}_load"] > 0 for e in range(4)) >= 3, stats
    model.eval()

    out = str(tmp_path / "moe")
    export_hf.export({out: llama_moe_hf.hf_slices(model, hf_cfg, 0, 1, 0)}, str(tmp_path),
                     hf_configs={out: llama_moe_hf.hf_config(hf_cfg, moe)})
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(lm).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert (lm(ids).logits - ours).abs().max() <= 1e-5
    back = _moe_model(AutoConfig.from_pretrained(out), moe, single, out)
    a, b = model.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "_extra_state" not in k)


@pytest.mark.parametrize("rows", ["packed", "padded"])
def test_padding_takes_no_expert_no_capacity_and_no_part_of_the_switch_loss(single, tmp_path, rows):
    """Training through the joined model on packed rows (segment ids, 0 = padding) or padded ones (one sample per
    row, causal, the collate's padding_mask): whatever the padding tokens are, the real tokens' logits, what is
    dropped and every gradient (the Switch loss's included) are the same, and only real tokens are routed and
    counted. Capacity 1.0 so that dropping bites; identical padding tokens would crowd one expert. The decoder
    called without the mask (megatron-core's default) routes the padding."""
    from transformers import AutoConfig

    from megatron_p2t.checkpoint import llama_moe_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.data.instruct import Encoded, collate_instruct
    from megatron_p2t.models import llama, llama_moe, p2t
    from megatron_p2t.models.parts_config import FreezeConfig, MoEConfig
    from tests.synthetic import make_llama_moe
    path = make_llama_moe(str(tmp_path / "moe"))
    hf_cfg = AutoConfig.from_pretrained(path)
    moe = MoEConfig(experts=hf_cfg.num_experts, top_k=hf_cfg.num_experts_per_tok, capacity_factor=1.0)
    from megatron_p2t import parts
    from megatron_p2t.config import ModelConfig
    mcfg = ModelConfig(encoder="none", connector="none", decoder="llama_moe", moe=moe, freeze=FreezeConfig(llm=False))
    model = p2t.Prot2TextModel(mcfg, parts.of(mcfg), None, hf_cfg, None, placeholder_id=0,
                               llm_config=llama.transformer_config(hf_cfg, layout=single, moe=moe))
    copy_into(model.llm, llama_moe_hf.megatron_tensors(model.llm, HFDir(path), hf_cfg, moe, 0, 1), path)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 32), generator=g)
    if rows == "packed":
        seg = torch.tensor([[1] * 10 + [2] * 8 + [0] * 14, [1] * 20 + [0] * 12])
        pos = torch.cat([torch.arange(10), torch.arange(8), torch.arange(14)]).expand(2, -1)
        masks = {"attention_mask": seg}
    else:
        enc = [Encoded(ids[r, :n].numpy(), np.full(n, -100), 0) for r, n in ((0, 18), (1, 20))]
        b = collate_instruct(enc, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 0, pack=False)
        ids = torch.cat([b["input_ids"], ids[:, 20:]], 1)      # a row 32 long: 12 padding columns more
        seg = torch.nn.functional.pad((~b["padding_mask"]).long(), (0, 12))
        pos = torch.arange(32).expand(2, -1)
        masks = {"attention_mask": None, "padding_mask": seg == 0}
    real = seg > 0
    assert int(real.sum()) == 38

    def run(pad_ids, forward):
        model.zero_grad(set_to_none=True)
        kw = masks if forward is model else {"attention_mask": masks["attention_mask"]}
        logits = forward(input_ids=torch.where(real, ids, pad_ids), position_ids=pos, **kw)
        logits[real].float().logsumexp(-1).mean().backward()   # the Switch loss's gradient rides on probs
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = [m.router.take_stats() for m in llama_moe.moe_layers(model)]
        return logits[real].detach(), grads, stats

    a_logits, a_grads, a_stats = run(torch.zeros_like(ids), model)                 # one token repeated
    b_logits, b_grads, b_stats = run(torch.randint(0, hf_cfg.vocab_size, ids.shape, generator=g), model)
    torch.testing.assert_close(a_logits, b_logits, rtol=0, atol=0)
    assert a_grads.keys() == b_grads.keys() and any("router" in n for n in a_grads)
    for n in a_grads:
        torch.testing.assert_close(a_grads[n], b_grads[n], rtol=1e-6, atol=1e-9, msg=n)
    for sa, sb in zip(a_stats, b_stats):
        assert torch.equal(sa, sb) and sa[-2] == int(real.sum()), (sa, sb)   # routed: the 38 real tokens only
        assert sa[-1] > 0                                                     # capacity 1.0 did drop some
    *_, unmasked = run(torch.zeros_like(ids), model.llm)
    assert all(s[-2] == seg.numel() for s in unmasked)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from tests.synthetic import make_llama_moe
    ckpt = make_llama_moe(str(tmp_path_factory.mktemp("moe_ck")))
    out = tmp_path_factory.mktemp("moe_out")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        os.path.join(ROOT, "tests", "models", "dist_moe_main.py"), "--ckpt", ckpt, "--out", str(out),
                        "--reshard", str(out / "dist_ckpt"),
                        *[f"--case={t}:{p}:{e}" for t, p, e in LAYOUTS]],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,ep", LAYOUTS[1:])
def test_expert_tensor_pipeline_parallel_equal_one_process(launched, tp, pp, ep):
    """Losses, every gradient (Switch loss included, reduced as training reduces them) and the router counts of
    each layout equal the reference computed by one process on the same micro-batches (capacity 1.25: the same
    tokens dropped); a distributed checkpoint written at TP=1 x EP=2 reloads at every other layout."""
    ranks = [json.load(open(f)) for f in sorted(glob.glob(str(launched / f"tp{tp}pp{pp}ep{ep}" / "rank*.json")))]
    assert len(ranks) == 4
    for r in ranks:
        assert r["checked"] == r["params"] > 0
        assert r["grad_rel"] <= 2e-6 and r["grad_diff"] <= 1e-6, r
        assert r["stat_diff"] == 0.0 and r["stat_keys"]
        assert r["local_experts"] == 4 // ep
        if r["loss_diff"] is not None:
            assert r["loss_diff"] <= 2e-6, r
    assert sorted({r["ep_rank"] for r in ranks}) == list(range(ep))
    # the trainer's expert optimizer (state partitioned over the ranks holding the same experts): the reference's
    # norm and step, and a checkpoint that gives them back
    for r in ranks:
        o = r["optimizer"]
        if ep == 1:
            assert o is None
            continue
        assert o["expert_dp"] == 4 // tp // pp // ep and o["tensors"] > 0 and o["partitioned"], o
        assert o["norm_rel"] <= 2e-6 and o["step_diff"] <= 1e-3 * o["update"], o
        assert max(o["reloaded_diff"], o["masters_diff"]) <= 1e-3 * o["update"], o
    # the megatron distributed checkpoint the EP=2 case wrote, read back at this layout: the same tensors
    if (tp, pp, ep) != LAYOUTS[1]:
        assert all(r["resharded"] is True for r in ranks)
