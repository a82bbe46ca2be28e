"""`megatron-p2t import-hf` at TP=2, then `export-hf` from PP=2: HF in, HF out, bit-identical."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_p2t.checkpoint.hf_dir import HFDir
from tests.conftest import ROOT
from megatron_p2t.models.tiny import make_all

pytestmark = pytest.mark.slow


def _cli(nproc, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "megatron_p2t", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return r


def test_import_then_export_through_the_cli(tmp_path):
    src = make_all(str(tmp_path / "tiny"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model:
  esm: {src['esm']}
  llama: {src['llama']}
  projector: {{input_dim: 0, intermediate_dim: 32, output_dim: 0, dropout: 0.0}}
  connector_weights: {src['projector']}
""")
    r = _cli(2, "import-hf", "--config", str(cfg), "--out", str(tmp_path / "mck"), "parallel.tensor=2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert os.path.exists(tmp_path / "mck" / "megatron_p2t.json")
    r = _cli(2, "export-hf", "--config", str(cfg), "--checkpoint", str(tmp_path / "mck"), "--out",
             str(tmp_path / "hf"), "parallel.pipeline=2")
    assert r.returncode == 0, r.stderr[-4000:]
    n = 0
    for part, prefix in (("llama", ""), ("esm", "esm."), ("projector", "")):
        got, want = HFDir(str(tmp_path / "hf" / part)), HFDir(src[part])
        for name in got.keys():
            if name.endswith("inv_freq"):     # a buffer EsmModel derives (and names) itself: checked below
                continue
            assert torch.equal(got.get(name), want.get(prefix + name)), name
            n += 1
    assert n == 96       # the contact head (2 tensors) too, carried from the source ESM
    # esm/ is a whole EsmModel checkpoint: it loads with nothing missing, its buffers as EsmModel computes them
    from transformers import EsmModel
    esm, info = EsmModel.from_pretrained(str(tmp_path / "hf" / "esm"), add_pooling_layer=False,
                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = dict(esm.named_buffers())
    for name, buf in EsmModel(esm.config, add_pooling_layer=False).named_buffers():
        assert torch.equal(loaded[name], buf), name
    # without projector weights the projector keeps a fresh initialisation; everything else is still imported
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(cfg.read_text().replace(f"  connector_weights: {src['projector']}\n", ""))
    r = _cli(1, "import-hf", "--config", str(fresh), "--out", str(tmp_path / "mck2"))
    assert r.returncode == 0, r.stderr[-4000:]


def test_layout_that_does_not_divide_the_world_is_refused(tmp_path):
    src = make_all(str(tmp_path / "tiny"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{esm: {src['esm']}, llama: {src['llama']}}}\n")
    r = _cli(2, "import-hf", "--config", str(cfg), "--out", str(tmp_path / "x"), "parallel.tensor=3")
    assert r.returncode != 0 and "does not divide the world size 2" in r.stderr
