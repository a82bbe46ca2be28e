"""Checkpoints written before every connector sat at `connector` (Prot2Text-V2's projector was `projector.*`) keep
loading: a training run's DeepSpeed files resume and export bit for bit as the same run under today's names, and
an import's megatron dist-checkpoint loads."""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _as_written_before(step: str) -> None:
    """Rewrite a step directory as the code before the rename wrote it: module and shapes under `projector.*`,
    and no checksums.json (that code wrote none; such a step is read as it is)."""
    os.remove(os.path.join(step, "checksums.json"))
    for f in os.listdir(step):
        path = os.path.join(step, f)
        if f.startswith("mp_rank_") and f.endswith("_model_states.pt"):
            sd = torch.load(path, map_location="cpu", weights_only=False)
            sd["module"] = {k.replace("connector.", "projector.", 1) if k.startswith("connector.") else k: v
                            for k, v in sd["module"].items()}
            torch.save(sd, path)
        elif f.startswith("extra_rank"):
            extra = torch.load(path, weights_only=False)
            extra["shapes"] = {k.replace("connector.", "projector.", 1) if k.startswith("connector.") else k: v
                               for k, v in extra["shapes"].items()}
            torch.save(extra, path)


def test_a_run_written_as_projector_resumes_and_exports_as_today(built_sample, tiny_tokenizer, tmp_path):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    data, _ = built_sample
    vocab = len(load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(tmp_path / "llama"), vocab=vocab + (-vocab) % 8)
    tiny.make_esm(str(tmp_path / "esm"))
    tiny.make_projector(str(tmp_path / "proj"), inter=64, out=64)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "megatron_p2t", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=900)
    common = ["--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"),
              f"data.manifest={data}/manifest.json",
              f"data.text_tokenizer={tiny_tokenizer}", f"model.encoder_path={tmp_path}/esm",
              f"model.llama={tmp_path}/llama", f"model.connector_weights={tmp_path}/proj", "instruct.init_from=",
              "data.max_protein_residues=120", "instruct.pack_length=256", "train.save_every=2", "train.log_every=1",
              "train.tensorboard=false"]
    r = run("instruct", *common, "train.steps=2", f"train.save_dir={tmp_path}/old")
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    _as_written_before(str(tmp_path / "old" / "step00000002"))
    module = torch.load(tmp_path / "old" / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert any(k.startswith("projector.") for k in module["module"])
    # the old-named step resumes (the trainer's shape check, DeepSpeed's module and optimizer load) to step 3
    r = run("instruct", *common, "train.steps=3", f"train.save_dir={tmp_path}/old", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "old" / "train_log.jsonl")]
    assert len(losses) == 3 and all(l == l for l in losses)
    for name in ("old", "new"):       # the step written under the old names exports as the same step under today's
        r = run("export", "--checkpoint", f"{tmp_path}/{name}/step00000002", "--out", f"{tmp_path}/{name}_hf")
        assert r.returncode == 0, r.stderr[-3000:]
    exported = [os.path.relpath(os.path.join(d, f), tmp_path / "new_hf") for d, _, fs in os.walk(tmp_path / "new_hf")
                for f in fs if f.endswith(".safetensors")]
    assert len(exported) >= 4     # llama, adapter, esm, projector
    for f in exported:
        assert filecmp.cmp(tmp_path / "new_hf" / f, tmp_path / "old_hf" / f, shallow=False), f


def test_an_import_written_as_projector_loads(single, tmp_path):
    """A megatron dist-checkpoint (import-hf / import-p2tv2) whose connector tensors are `projector.*`."""
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from megatron_p2t import parts
    from megatron_p2t.checkpoint import sharded
    from megatron_p2t.config import ModelConfig
    from megatron_p2t.models import tiny
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.models.p2t import Prot2TextModel, legacy_name
    from megatron_p2t.models.parts_config import ProjectorConfig
    esm_cfg = AutoConfig.from_pretrained(tiny.make_esm(str(tmp_path / "esm")))
    llama_cfg = AutoConfig.from_pretrained(tiny.make_llama(str(tmp_path / "llama")))
    mcfg, pcfg = ModelConfig(), ProjectorConfig(input_dim=48, intermediate_dim=32, output_dim=64, dropout=0.0)

    def model(seed):
        torch.manual_seed(seed)
        return Prot2TextModel(mcfg, parts.of(mcfg), ESMConfig.from_hf(esm_cfg), llama_cfg, pcfg, 5, layout=single)
    written = model(0)
    sd = written.sharded_state_dict()
    renamed = 0
    for st in sd.values():
        if hasattr(st, "key") and legacy_name(st.key) != st.key:
            st.key, renamed = legacy_name(st.key), renamed + 1
    assert renamed >= 4                      # fc1/fc2 weight and bias (and the layers' extra states)
    os.makedirs(tmp_path / "ckpt")
    dist_checkpointing.save(sd, str(tmp_path / "ckpt"))
    loaded = model(1)
    sharded.load(loaded, str(tmp_path / "ckpt"))
    for (n, a), (_, b) in zip(written.state_dict().items(), loaded.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), n
