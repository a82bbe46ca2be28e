"""Rank discovery for every launcher: torchrun/deepspeed env, mpirun (mpi4py), srun (SLURM), none."""
import os

import pytest

from megatron_p2t.parallel import launch_env

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
