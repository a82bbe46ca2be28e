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


# the cases of each launch, in launch order: world 2 saves at TP=2 first, the other worlds then reload it
LAUNCHES = {2: ["save:2:1", "load:1:2"], 1: ["roundtrip:1:1", "load:1:1", "load-wrong:1:1"],
            4: ["roundtrip:2:2", "load:2:2"]}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The three launches (one per world size; dist_ckpt_main.py runs a launch's cases one after another), run on
    first use; returns (work dir, the first failure or None)."""
    work = tmp_path_factory.mktemp("ck")
    make_all(str(work / "tiny"))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for world, cases in LAUNCHES.items():
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={world}", os.path.join(ROOT, "tests", "models", "dist_ckpt_main.py"),
                            "--ckpt", str(work / "tiny"), "--work", str(work), *[f"--case={c}" for c in cases]],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return work, f"world {world} ({cases}): " + r.stdout[-2000:] + r.stderr[-4000:]
    return work, None


def _ranks(launched, mode, tp, pp):
    work, error = launched
    assert error is None, error
    return [json.load(open(p)) for p in sorted(glob.glob(str(work / f"{mode}-tp{tp}pp{pp}" / "rank*.json")))]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_import_export_is_bit_identical(launched, tp, pp):
    r = _ranks(launched, "roundtrip", tp, pp)[0]
    # every tensor of the sources (ESM's contact head too) and the rotary buffer: esm/ loads with nothing missing
    assert r["unequal"] == [] and r["compared"] == 97 and r["esm_missing"] == []
    assert "model.safetensors" in r["llama_files"] and "config.json" in r["llama_files"]


@pytest.mark.slow
def test_saved_at_tp2_reloads_at_other_layouts(launched):
    assert len(_ranks(launched, "save", 2, 1)) == 2
    for tp, pp in ((1, 1), (1, 2), (2, 2)):
        diffs = [r["logit_diff"] for r in _ranks(launched, "load", tp, pp) if "logit_diff" in r]
        assert diffs and max(diffs) <= 1e-5, (tp, pp, diffs)
    err = _ranks(launched, "load-wrong", 1, 1)[0]["error"]
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
