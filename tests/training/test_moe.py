"""Stage 2 with the mixture-of-experts decoder (model.decoder=llama_moe) on the shared sample, tiny models (CPU):
expert parallelism through the trainer, its checkpoints and resume, export to Qwen2-MoE with --verify, and the
router counts in the log."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, built_sample, tiny_tokenizer):
    from megatron_p2t.cli import main
    from megatron_p2t.models.tiny import make_projector
    root = tmp_path_factory.mktemp("moe")
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(root / "tiny")]) == 0
    make_projector(str(root / "proj"), esm_hidden=48, inter=64, out=64)
    out, _ = built_sample
    overrides = ["--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"),
                 f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
                 f"model.encoder_path={root}/tiny/esm", f"model.llama={root}/tiny/llama", "instruct.init_from=",
                 f"model.connector_weights={root}/proj", "data.batch_size=4", "data.max_protein_residues=120",
                 "model.decoder=llama_moe", "model.llm_lora.dropout=0.0", "train.clip_grad=0.1",
                 "train.log_every=1"]
    return root, overrides


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _torchrun(nproc, *args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "megatron_p2t", *args], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _log(d):
    return [json.loads(l) for l in open(os.path.join(d, "train_log.jsonl"))]


def test_expert_parallel_training_equals_ep1_resumes_exactly_and_exports(setup, tmp_path):
    """DP=2 with the experts split over the two ranks (EP=2) trains like DP=2 with every expert on both ranks
    (EP=1), step for step, gradient clipping included (one norm over every parameter, 0.1: it bites); an
    interrupted EP=2 run resumes to the same weights; the export (started with its own processes, one per
    expert-parallel rank) loads in transformers as Qwen2MoeForCausalLM and its logits equal the trained model's."""
    root, ov = setup
    # no capacity dropping here: which tokens a full expert drops turns on their router scores' order, and after
    # step 1 the two layouts' weights differ by rounding (their gradients are reduced in other orders), enough to
    # swap two near-equal scores at a capacity boundary and move the loss by ~3e-5. EP with dropping is checked
    # exactly, one step per layout, in tests/models/test_moe.py.
    ov = [*ov, "model.moe.capacity_factor=null"]
    runs = {}
    for ep in (1, 2):
        d = tmp_path / f"ep{ep}"
        _torchrun(2, "instruct", *ov, f"parallel.expert={ep}", "train.steps=3", "train.save_every=2",
                  f"train.save_dir={d}")
        runs[ep] = _log(d)
    for a, b in zip(runs[1], runs[2]):
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        # one norm over experts and the rest, as EP=1 (where DeepSpeed holds the experts) clips; 0.1 bites
        assert a["grad_norm"] > 0.1 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"], (a, b)
        assert 0 < b["expert_grad_norm"] < b["grad_norm"]
        # the same tokens to the same experts; after a step's rounding differences a near-tie may turn
        tol = 1e-9 if a["step"] == 1 else 2e-3
        for k in a:
            if k.startswith("moe/"):
                assert abs(a[k] - b[k]) <= tol, (a["step"], k, a[k], b[k])
    first = runs[2][0]
    layers = {k.split("/")[1] for k in first if k.startswith("moe/")}
    assert len(layers) == 4 and all(0.0 <= first[f"moe/{l}/dropped"] < 1.0 for l in layers)
    assert all(abs(sum(first[f"moe/{l}/expert{e}_load"] for e in range(4)) - 1.0) < 1e-9 for l in layers)
    assert "expert_grad_norm" in first and "expert_grad_norm" not in runs[1][0]
    assert os.path.exists(tmp_path / "ep2" / "step00000003" / "experts_ep01_mp00.pt")
    import torch
    module = torch.load(tmp_path / "ep2" / "step00000003" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    experts = torch.load(tmp_path / "ep2" / "step00000003" / "experts_ep00_mp00.pt")
    # the experts are written once, in their own files; DeepSpeed's module file holds the rest of what trains
    assert experts and not set(experts) & set(module) and any(".router." in k for k in module), sorted(module)[:8]

    # resumed from its step-2 checkpoint: the same step 3, the same experts
    d = tmp_path / "ep2"
    names = ("experts_ep00_mp00.pt", "experts_ep01_mp00.pt")
    before = {n: torch.load(d / "step00000003" / n) for n in names}
    (d / "latest").write_text("step00000002")
    _torchrun(2, "instruct", *ov, "parallel.expert=2", "train.steps=3", "train.save_every=2", f"train.save_dir={d}",
              "--resume", "auto")
    assert [r["loss"] for r in _log(d)] == [r["loss"] for r in runs[2]]
    for n in names:
        after = torch.load(d / "step00000003" / n)
        assert after.keys() == before[n].keys() and all(torch.equal(after[k], before[n][k]) for k in after)

    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "export", "--checkpoint", str(tmp_path / "ep2"),
                        "--out", str(tmp_path / "hf"), "--verify"], env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4, report
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "llama")
    assert type(lm).__name__ == "Qwen2MoeForCausalLM" and lm.config.num_experts == 4
    assert not (tmp_path / "hf" / "adapter").exists()
    info = json.load(open(tmp_path / "hf" / "megatron_p2t.json"))
    assert info["decoder"] == "llama_moe"
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">sp|P1|A_HUMAN x\nMKTAYIAKQRQISFVKSHFSRQ\n>sp|P2|B_HUMAN y\nMSSILPFTPPIVKRLLGW\n")
    from megatron_p2t.inference import generate
    rep = generate.run(str(tmp_path / "hf"), str(fasta), str(tmp_path / "preds.jsonl"), max_new_tokens=4)
    rows = [json.loads(l) for l in open(tmp_path / "preds.jsonl")]
    assert rep["generated"] == 2 and sorted(r["accession"] for r in rows) == ["P1", "P2"], rep

    # the MoE run's checkpoint into a dense config: refused, naming the difference
    from megatron_p2t.config import ConfigError, check_same_recipe, load_config
    dense = load_config(ov[1], [*ov[2:], "model.decoder=llama"])
    with pytest.raises(ConfigError, match="model.decoder=llama_moe there, llama here"):
        check_same_recipe(str(tmp_path / "ep2"), dense, "instruct.init_from")


def test_refusals_before_any_work(setup, tmp_path):
    """Experts not divisible by parallel.expert, top-k above the expert count, parallel.expert beyond the
    data-parallel size, and an MoE checkpoint named as a dense config's decoder: refused with the fix."""
    from megatron_p2t.checkpoint.hf_dir import CheckpointError
    from megatron_p2t.parts.assemble import hf_configs
    from megatron_p2t.config import ConfigError, load_config
    from tests.synthetic import make_llama_moe
    root, ov = setup
    base = ov[2:]
    cfg_path = ov[1]
    with pytest.raises(ConfigError, match="not divisible by parallel.expert=3"):
        load_config(cfg_path, [*base, "parallel.expert=3"])
    with pytest.raises(ConfigError, match="top_k=5 is more than model.moe.experts=4"):
        load_config(cfg_path, [*base, "model.moe.top_k=5"])
    with pytest.raises(ConfigError, match="model.decoder=llama has none"):
        load_config(cfg_path, [*base, "model.decoder=llama", "parallel.expert=2"])
    from megatron_p2t.parallel.layout import LayoutError, check_layout
    with pytest.raises(LayoutError, match="parallel.expert=2 does not divide the data-parallel size 1"):
        check_layout(2, 2, 1, 2)          # what parallel.state.initialize checks first (TP=2 x EP=2 on 2 ranks)
    moe_dir = make_llama_moe(str(tmp_path / "moe"), vocab=1024)
    dense = load_config(cfg_path, [*base, "model.decoder=llama", f"model.llama={moe_dir}"])
    with pytest.raises(CheckpointError, match="is a mixture of 4 experts .* set model.decoder=llama_moe"):
        hf_configs(dense.model)
    other = load_config(cfg_path, [*base, f"model.llama={moe_dir}", "model.moe.experts=8"])
    with pytest.raises(CheckpointError, match="a mixture of 4 experts, top-1; this run has model.moe.experts=8"):
        hf_configs(other.model)
