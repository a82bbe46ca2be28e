"""What the launcher tests share: the tiny stage-1 job's arguments and torchrun's run of it, the reference every
other launcher (sbatch/srun, mpirun, the DeepSpeed launcher with a hostfile) must reproduce exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

STEPS = 30


@pytest.fixture(scope="session")
def job_args(tmp_path_factory, built_sample, tiny_tokenizer):
    """The tiny stage-1 config's overrides, and torchrun's losses and final weights for it (the reference)."""
    from megatron_p2t.cli import main
    root = tmp_path_factory.mktemp("launch_align")
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(root / "tiny")]) == 0
    out, _ = built_sample
    ov = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}", "data.batch_size=8",
          f"model.esm={root}/tiny/esm", f"model.llama={root}/tiny/llama", f"train.steps={STEPS}",
          "train.save_every=1000", "train.tensorboard=false"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "megatron_p2t", "align", "--config", "configs/align_tiny_cpu.yaml", *ov,
                        f"train.save_dir={root}/torchrun"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, ov


def losses(d):
    return [json.loads(l)["loss"] for l in open(os.path.join(d, "train_log.jsonl"))]


def final_weights(d):
    tag = open(os.path.join(d, "latest")).read().strip()
    module = torch.load(os.path.join(d, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return {k: v for k, v in module.items() if torch.is_tensor(v)}  # megatron's _extra_state entries are None
