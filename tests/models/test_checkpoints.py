"""HF import -> export round trips and megatron sharded checkpoints across layouts (torchrun, gloo)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from megatron_p2t.checkpoint import sharded
from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
from tests.conftest import ROOT
from megatron_p2t.models.tiny import make_all


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    make_all(str(root / "tiny"))
    return root


def _run(work, nproc, tp, pp, mode):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        os.path.join(ROOT, "tests", "models", "dist_ckpt_main.py"), "--ckpt", str(work / "tiny"),
                        "--work", str(work), "--tp", str(tp), "--pp", str(pp), "--mode", mode],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = [json.load(open(p)) for p in sorted(glob.glob(str(work / f"{mode}_rank*.json")))]
    for p in glob.glob(str(work / f"{mode}_rank*.json")):
        os.remove(p)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_import_export_is_bit_identical(work, tp, pp):
    r = _run(work, tp * pp, tp, pp, "roundtrip")[0]
    assert r["unequal"] == [] and r["compared"] == 94
    assert "model.safetensors" in r["llama_files"] and "config.json" in r["llama_files"]


@pytest.mark.slow
def test_saved_at_tp2_reloads_at_other_layouts(work):
    _run(work, 2, 2, 1, "save")
    for nproc, tp, pp in ((1, 1, 1), (2, 1, 2), (4, 2, 2)):
        diffs = [r["logit_diff"] for r in _run(work, nproc, tp, pp, "load") if "logit_diff" in r]
        assert diffs and max(diffs) <= 1e-5, (tp, pp, diffs)
    err = _run(work, 1, 1, 1, "load-wrong")[0]["error"]
    assert err and "linear_fc2.weight" in err and "different model shape" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no megatron checkpoint here"):
        sharded.load(None, str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="save_pretrained"):
        HFDir(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        HFDir(str(tmp_path / "nope"))


def test_hf_dir_reads_slices_of_sharded_checkpoints(tmp_path):
    from transformers import LlamaForCausalLM
    from megatron_p2t.models.tiny import make_llama
    d = make_llama(str(tmp_path / "l"))
    ck = HFDir(d)
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    assert len(set(ck.where.values())) > 1, "the tiny checkpoint is split over several files"
    full = dict(LlamaForCausalLM.from_pretrained(d).named_parameters())
    w = full["model.layers.1.self_attn.o_proj.weight"]
    assert ck.get("model.layers.1.self_attn.o_proj.weight", 1, 16, 48).equal(w[:, 16:48].detach())
    assert ck.get("model.embed_tokens.weight", 0, 128, 256).equal(full["model.embed_tokens.weight"][128:].detach())
    with pytest.raises(CheckpointError, match="missing"):
        ck.get("model.layers.9.mlp.up_proj.weight")
