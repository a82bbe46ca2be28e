"""Stage 2 on the shared sample's shards with tiny random models (CPU, gloo)."""
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
    root = tmp_path_factory.mktemp("instruct")
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(root / "tiny")]) == 0
    make_projector(str(root / "proj"), esm_hidden=48, inter=64, out=64)  # identical weights at every layout
    out, _ = built_sample
    overrides = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
                 f"model.esm={root}/tiny/esm", f"model.llama={root}/tiny/llama", "instruct.init_from=",
                 f"model.projector_weights={root}/proj", "data.batch_size=6", "data.max_protein_residues=200"]
    return root, overrides


def _torchrun(nproc, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_packed_equals_padded_and_tp2_equals_tp1(setup, tmp_path):
    root, ov = setup
    script = os.path.join(ROOT, "tests", "training", "dist_instruct_main.py")
    for tp in (1, 2):
        _torchrun(tp, script, "--tp", str(tp), "--work", str(tmp_path), *ov)
        for rank in range(tp):
            r = json.load(open(tmp_path / f"tp{tp}_rank{rank}.json"))
            assert r["rows"][0] == 6 and r["rows"][1] < 6, r           # packing really packed
            assert r["trainable"] == ["lora", "projector"], r
            assert r["loss_diff"] <= 1e-6 * r["loss"] and r["grad_diff"] <= 1e-5, r   # fp32, relative
            if tp == 2:
                assert r["vs_tp1_loss"] <= 1e-6 and r["vs_tp1_grad"] <= 1e-5 and r["compared"] > 25, r
