"""launch/slurm/*.sbatch on a real SLURM (Debian's slurm-wlm started here for localhost): the 2-task stage-1 job
gives torchrun's losses, and a pre-empted job checkpoints, requeues itself and resumes to the same final state."""
import os
import sys
import time

import pytest

from tests.conftest import ROOT, STAGE1_STEPS, same_run
from tests.launch.slurm_cluster import SlurmCluster, missing_tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_tools():
        pytest.fail(f"SLURM tools missing: {missing_tools()}; `bash launch/setup.sh` installs slurm-wlm and munge")
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    c.start()
    yield c
    c.stop()


def _submit(cluster, root, ov, name, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable, P2T_ROOT=ROOT, DS_ACCELERATOR="cpu",
               CONFIG="configs/align_tiny_cpu.yaml", OMP_NUM_THREADS="1")
    # the script's cluster-sized parameters, overridden for one 2-CPU node without GPUs
    return cluster.sbatch(["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gres=none", "--cpus-per-task=1",
                           "--time=20", f"--output={root}/{name}.out", *extra,
                           os.path.join(ROOT, "launch", "slurm", "align.sbatch"), *ov,
                           f"train.save_dir={root}/{name}"], env=env, cwd=ROOT)


def test_sbatch_align_job_gives_torchruns_losses(cluster, stage1_job):
    root, ov = stage1_job
    job = _submit(cluster, root, ov, "sbatch")
    info = cluster.wait(job, timeout=900)
    out = open(root / "sbatch.out").read()
    assert info["JobState"] == "COMPLETED", out[-3000:] + cluster.logs()
    assert f"job {job} restart 0 on " in out and "2 tasks, align" in out
    same_run(root / "sbatch", root / "torchrun")


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_final_state(cluster, stage1_job):
    root, ov = stage1_job
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
    assert 2 <= stopped_at < STAGE1_STEPS, "the signal came too late to interrupt the run"
    assert f"job {job} restart 1 on " in out
    same_run(root / "preempt", root / "torchrun")
