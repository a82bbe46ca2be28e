"""A part of one's own, defined and registered in this file alone: a connector that mean-pools the encoder's states
over the protein and maps them with one linear layer to a single prompt vector. Named in the config's `imports`,
it trains through stage 1 (feature alignment) and stage 2, exports, reloads and generates -- no library file
knows it."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from megatron_p2t import parts
from megatron_p2t.checkpoint.slicing import Slice
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


class MeanPoolLinear(nn.Module):
    """ESM states [b, L, esm] + mask -> one vector per protein [b, 1, llm]. Plain torch, replicated over
    tensor-parallel ranks (they see the same states), and its own inference form."""

    def __init__(self, esm_dim: int, llm_dim: int, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(esm_dim, llm_dim, dtype=dtype)

    def forward(self, states, mask):
        keep = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.proj(pooled).unsqueeze(1), torch.ones(states.shape[0], 1, dtype=torch.bool,
                                                           device=states.device)


def _load(path):
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(path, "config.json")))
    m = MeanPoolLinear(cfg["esm_dim"], cfg["llm_dim"])
    m.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return m


MEANPOOL = parts.register(parts.ConnectorSpec(
    name="meanpool_linear", summary="a test's connector: the mean ESM state, one linear layer, one slot",
    slots=lambda residues, model_cfg: 1,
    build=lambda inputs: MeanPoolLinear(inputs.esm_hidden, inputs.llm_hidden, inputs.config.params_dtype),
    run=lambda module, states, mask: module(states, mask),
    adapter=parts.ConnectorAdapter(
        directory="meanpool",
        tensors=lambda src, module, tp_rank, tp, prefix="": {k: src.get(prefix + k) for k in module.state_dict()},
        slices=lambda module, tp_rank, tp, sd=None: [Slice(k, None, 0, 0, t) for k, t in
                                                     (module.state_dict() if sd is None else sd).items()],
        config=lambda module, esm_dim, llm_dim: {"esm_dim": esm_dim, "llm_dim": llm_dim},
        load=_load, run=lambda module, states, mask: module(states, mask)),
    params=lambda model_cfg, esm_hidden, llm_hidden, tp: esm_hidden * llm_hidden + llm_hidden))


def test_a_connector_registered_in_a_test_file_trains_exports_and_generates(built_sample, tiny_tokenizer, tmp_path):
    from megatron_p2t.inference import generate
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    data, _ = built_sample
    vocab = len(load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(tmp_path / "llama"), vocab=vocab + (-vocab) % 8)
    tiny.make_esm(str(tmp_path / "esm"))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               DS_ACCELERATOR="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "megatron_p2t", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=900)
    common = ["--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"), f"imports=[{__name__}]",
              "model.connector=meanpool_linear", f"data.manifest={data}/manifest.json",
              f"data.text_tokenizer={tiny_tokenizer}", f"model.encoder_path={tmp_path}/esm",
              f"model.llama={tmp_path}/llama",
              "data.max_protein_residues=200", "instruct.pack_length=256", "train.save_every=2"]
    # without the import, the name is refused with the way to add it
    r = run("instruct", *common[:2], *common[3:], f"train.save_dir={tmp_path}/x")
    assert r.returncode == 2 and "model.connector='meanpool_linear' is not a part" in r.stderr, r.stderr[-2000:]
    assert "imports" in r.stderr
    # stage 1: auto is feature alignment for a connector H-SCALE does not pool
    r = run("align", *common, "train.steps=4", "train.lr=0.01", f"train.save_dir={tmp_path}/align")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "align" / "megatron_p2t.json"))["stage"] == "align-feature"
    # stage 2 from stage 1's connector (read back through the part's own adapter), LoRA on the decoder
    r = run("instruct", *common, "train.steps=6", f"instruct.init_from={tmp_path}/align",
            f"train.save_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(losses) >= 2 and all(l == l for l in losses)
    r = run("export", "--checkpoint", f"{tmp_path}/run", "--out", f"{tmp_path}/hf", "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4 and report["max_abs_logit"] > 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "meanpool" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"proj.weight", "proj.bias"}
    info = json.load(open(tmp_path / "hf" / "megatron_p2t.json"))
    assert info["connector"] == "meanpool_linear" and info["imports"] == [__name__]
    preds = str(tmp_path / "preds.jsonl")
    res = generate.run(str(tmp_path / "hf"), f"{data}/manifest.json", preds, split="test", max_new_tokens=4)
    rows = [json.loads(line) for line in open(preds)]
    assert res["generated"] == len(rows) > 0 and all("prediction" in r for r in rows)
