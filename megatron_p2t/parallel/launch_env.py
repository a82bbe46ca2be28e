"""Who am I in the job: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for torch.distributed, from
whichever launcher started this process.

- torchrun and the DeepSpeed launcher set RANK etc. themselves: nothing to do.
- mpirun (OpenMPI, or any MPI via PMI): ranks from mpi4py; rank 0's host name and a free port on it are
  broadcast, so no environment needs to be passed by hand (`mpirun -np 16 --hostfile hosts python -m ...`).
- srun (SLURM, one task per GPU): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; MASTER_ADDR is the
  first node of SLURM_JOB_NODELIST, the port is derived from the job id so every task computes the same one.
  Only inside an srun step: a batch script's own process also sees SLURM_NTASKS but is a single process.
- none of these: a world of one on a free local port.
"""
from __future__ import annotations

import os
import socket
import subprocess
from typing import Dict

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The world of one we set up ourselves is marked with its own values: a child process that inherits them
# unchanged (a CLI command run from a script or test that initialised itself) is not part of a job, while a
# launcher's worker, which got fresh values, is.
_OWN = "MEGATRON_P2T_OWN_WORLD"


def _own_world() -> bool:
    return os.environ.get(_OWN) == f"{os.environ.get('RANK')}:{os.environ.get('WORLD_SIZE')}:" \
                                   f"{os.environ.get('MASTER_PORT')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def from_mpi() -> Dict[str, str]:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    master = comm.bcast((socket.gethostname(), int(os.environ.get("MASTER_PORT") or _free_port()))
                        if rank == 0 else None, root=0)
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local.Get_rank()),
            "LOCAL_WORLD_SIZE": str(local.Get_size()), "MASTER_ADDR": os.environ.get("MASTER_ADDR", master[0]),
            "MASTER_PORT": str(master[1])}


def first_slurm_node(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,9],login1" -> "gpu03"), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return head


def from_slurm() -> Dict[str, str]:
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    return {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR") or first_slurm_node(os.environ["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(20000 + job % 20000)}


def under_launcher() -> bool:
    """Whether some launcher started this process as part of a job (before discover() fills the variables)."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ and not _own_world()) \
        or any(k in os.environ for k in MPI_MARKERS) \
        or ("SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1)


def discover() -> str:
    """Fill the torch.distributed variables from the launcher; returns which launcher was found."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not _own_world():
        return "env"
    if any(k in os.environ for k in MPI_MARKERS):
        os.environ.update(from_mpi())
        return "mpi"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        os.environ.update(from_slurm())
        return "slurm"
    port = str(_free_port())
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ[_OWN] = f"0:1:{port}"
    return "single"
