"""launch/slurm/*.sbatch on a real SLURM (Debian's slurm-wlm started here for localhost): the 2-task stage-1 job
gives torchrun's losses, and a pre-empted job checkpoints, requeues itself and resumes to the same final state."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from tests.launch.slurm_cluster import SlurmCluster, missing_tools

pytestmark = pytest.mark.slow
STEPS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_tools():
        pytest.fail(f"SLURM tools missing: {missing_tools()}; `bash launch/setup.sh` installs slurm-wlm and munge")
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def job_args(tmp_path_factory, built_sample, tiny_tokenizer):
    """The tiny stage-1 config's overrides, and torchrun's losses and final weights for it (the reference)."""
    from megatron_p2t.cli import main
    root = tmp_path_factory.mktemp("slurm_align")
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


def _losses(d):
    return [json.loads(l)["loss"] for l in open(os.path.join(d, "train_log.jsonl"))]


def _final_weights(d):
    tag = open(os.path.join(d, "latest")).read().strip()
    return torch.load(os.path.join(d, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]


def _submit(cluster, root, ov, name, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable, P2T_ROOT=ROOT, DS_ACCELERATOR="cpu",
               CONFIG="configs/align_tiny_cpu.yaml", OMP_NUM_THREADS="1")
    # the script's cluster-sized parameters, overridden for one 2-CPU node without GPUs
    return cluster.sbatch(["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gres=none", "--cpus-per-task=1",
                           "--time=20", f"--output={root}/{name}.out", *extra,
                           os.path.join(ROOT, "launch", "slurm", "align.sbatch"), *ov,
                           f"train.save_dir={root}/{name}"], env=env, cwd=ROOT)


def test_sbatch_align_job_gives_torchruns_losses(cluster, job_args):
    root, ov = job_args
    job = _submit(cluster, root, ov, "sbatch")
    info = cluster.wait(job, timeout=900)
    out = open(root / "sbatch.out").read()
    assert info["JobState"] == "COMPLETED", out[-3000:] + cluster.logs()
    assert f"job {job} restart 0 on " in out and "2 tasks, align" in out
    assert _losses(root / "sbatch") == _losses(root / "torchrun") and len(_losses(root / "torchrun")) == STEPS
    ours, ref = _final_weights(root / "sbatch"), _final_weights(root / "torchrun")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_final_state(cluster, job_args):
    root, ov = job_args
    job = _submit(cluster, root, ov, "preempt")
    log = root / "preempt" / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@600` does before the time limit, now
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    info = cluster.wait(job, timeout=900)
    out = open(root / "preempt.out").read()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", out[-4000:] + cluster.logs()
    assert "USR1" in out and "signal received: checkpoint step" in out and f"requeueing job {job}" in out
    stopped_at = int(out.split("signal received: checkpoint step")[1].split()[0])
    assert 2 <= stopped_at < STEPS, "the signal came too late to interrupt the run"
    assert f"job {job} restart 1 on " in out
    assert _losses(root / "preempt") == _losses(root / "torchrun")
    ours, ref = _final_weights(root / "preempt"), _final_weights(root / "torchrun")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
