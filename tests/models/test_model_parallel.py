"""The megatron-core model against the HF reference at every parallel layout that runs here (gloo, CPU)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from megatron_p2t.models.tiny import make_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    make_all(root)
    return root


def _launch(tmp_path, nproc, *args):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        os.path.join(ROOT, "tests", "models", "dist_model_main.py"), "--out", str(out), *args],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = [json.load(open(p)) for p in sorted(glob.glob(str(out / "rank*.json")))]
    assert len(ranks) == nproc
    return ranks


LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("what", ["llama", "p2t"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_matches_hf_reference(tmp_path, ckpt, what, tp, pp):
    ranks = _launch(tmp_path, tp * pp, "--what", what, "--tp", str(tp), "--pp", str(pp), "--ckpt", ckpt)
    last = [r for r in ranks if r["pp_rank"] == pp - 1]
    for r in last:
        assert r["logit_diff"] <= 1e-5, r
        assert max(r["loss_diff"]) <= 1e-5, r
    for r in ranks:
        assert r["grads_checked"] == r["params"] > 0, "every parameter's gradient is compared"
        assert r["grad_diff"] <= 1e-5, r
    assert sum(r["params"] for r in ranks if r["tp_rank"] == 0) >= (27 if what == "llama" else 70)
    if what == "p2t":
        assert [r["trainable"] for r in ranks if r["pp_rank"] == 0][0] == ["projector"]
        assert all(r["trainable"] == [] for r in ranks if r["pp_rank"] > 0)


@pytest.mark.parametrize("tp", [1, 2])
def test_esm_matches_hf_on_real_sequences(tmp_path, ckpt, sample_records, tp):
    seqs = [r.sequence for r in sample_records if 40 <= len(r.sequence) <= 160][:6]
    (tmp_path / "seqs.txt").write_text("\n".join(seqs))
    ranks = _launch(tmp_path, tp, "--what", "esm", "--tp", str(tp), "--ckpt", ckpt,
                    "--sequences", str(tmp_path / "seqs.txt"))
    for r in ranks:
        assert r["padded"] > 0 and max(r["diffs"].values()) <= 1e-5, r


@pytest.mark.parametrize("tp", [1, 2])
def test_text_side_pools_layer_k_like_hf(tmp_path, ckpt, tp):
    ranks = _launch(tmp_path, tp, "--what", "text", "--tp", str(tp), "--ckpt", ckpt)
    for r in ranks:
        assert set(r["diffs"]) == {"1", "2", "3"} and max(r["diffs"].values()) <= 1e-5, r
        assert r["last_layer_refused"]


@pytest.mark.parametrize("tp", [1, 2])
def test_esm_lora_matches_peft_and_merges(tmp_path, ckpt, sample_records, tp):
    seqs = [r.sequence for r in sample_records if 40 <= len(r.sequence) <= 160][:4]
    (tmp_path / "seqs.txt").write_text("\n".join(seqs))
    ranks = _launch(tmp_path, tp, "--what", "esm_lora", "--tp", str(tp), "--ckpt", ckpt,
                    "--sequences", str(tmp_path / "seqs.txt"))
    for r in ranks:
        assert r["lora_effect"] > 1e-2, "the adapter must change the output for the comparison to mean anything"
        assert r["out_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5, r
        assert r["grads"] == 4 * 3 and r["trainable"] == ["lora_A", "lora_B"] and r["merged"] == 2 * 3
        assert r["merge_diff"] <= 1e-5, r


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_lora_matches_peft_exports_its_layout_and_merges(tmp_path, ckpt, tp):
    ranks = _launch(tmp_path, tp, "--what", "llama_lora", "--tp", str(tp), "--ckpt", ckpt)
    layers, projections = 4, 7
    for r in ranks:
        assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-5, r
        assert r["grads"] == layers * 4 * 2 and r["trainable"] == ["lora_A", "lora_B"]
        assert r["export_diff"] == 0 and r["merge_diff"] <= 1e-5, r
    exported = set().union(*(r["exported"] for r in ranks))
    assert len(exported) == layers * projections * 2
