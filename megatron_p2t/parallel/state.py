"""Initialise torch.distributed (through DeepSpeed, as the launchers expect) and megatron-core's TP/PP/DP groups."""
from __future__ import annotations

import datetime
import os

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_p2t.parallel import cpu_shim, launch_env
from megatron_p2t.parallel.layout import Layout, ParallelConfig, check_layout


def initialize(parallel: ParallelConfig, backend: str | None = None) -> Layout:
    """Set up process groups for `parallel` (a run config's `parallel` section) and return this process's
    Layout. Safe to call again in the same process: megatron's groups are rebuilt only after `destroy`."""
    if cpu_shim.enable():
        _skip_inference_shm_op()  # before DeepSpeed's comm backend starts, here or in deepspeed.initialize
    launch_env.discover()  # torchrun / deepspeed / mpirun / srun / nothing
    if not torch.distributed.is_initialized():
        import deepspeed  # deferred: the launchers' rendezvous goes through it, nothing else here needs it
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=datetime.timedelta(minutes=parallel.timeout_minutes))
    if not torch.cuda.is_available():
        keep_freed_memory()
    check_layout(torch.distributed.get_world_size(), parallel.tensor, parallel.pipeline, parallel.expert)
    if not ps.model_parallel_is_initialized():
        # experts are split over data-parallel ranks and, inside each expert, over the tensor-parallel ones
        # (megatron-core's default expert_tensor_parallel_size = tensor_model_parallel_size)
        ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor,
                                     pipeline_model_parallel_size=parallel.pipeline,
                                     expert_model_parallel_size=parallel.expert)
    model_parallel_cuda_manual_seed(parallel.seed)
    return current()


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles its shared-memory all-reduce (`deepspeed_shm_comm`) as it starts:
    25-40 s of g++ on the first run on each machine (CI's cache starts empty), while every other DeepSpeed process
    waits on the build's lock, and a hard failure where no C++ compiler is installed. Only its inference kernels use
    it (`inference_all_reduce`, AutoTP); training's collectives are torch.distributed's. DeepSpeed keeps its op
    compatibility table as one module dict that it reads before building (`deepspeed.ops.__compatible_ops__`, whose
    comment says edits to it persist): marked incompatible, the op is not built and the backend runs without it, as
    on platforms that cannot build it."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def current() -> Layout:
    """This process's Layout from megatron-core's groups (set up by `initialize`)."""
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("parallel.state.initialize(cfg.parallel) has not run in this process")
    mp = ps.get_model_parallel_group()
    return Layout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                  dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                  rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                  pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
                  tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
                  dp_group=ps.get_data_parallel_group(), mp_group=mp,
                  tp_src_rank=ps.get_tensor_model_parallel_src_rank(), mp_rank=torch.distributed.get_rank(mp),
                  ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
                  ep_group=ps.get_expert_model_parallel_group(),
                  expert_dp_group=ps.get_expert_data_parallel_group())


def keep_freed_memory() -> None:
    """CPU training: let glibc keep freed memory instead of unmapping it. By default every activation larger than
    the mmap threshold is a fresh mapping whose pages fault in one by one and go back to the kernel when freed;
    the stage-1 retrieval demo (2 ranks, 2 cores) then spent 50 s of 76 in the kernel with 13 M page faults, and
    1.7x longer per step than with this (0.8 M faults). Left alone when the user set glibc's malloc tunables
    (the planner's memory measurement sets them to return memory at once) or where libc is not glibc."""
    import ctypes
    if any(k in os.environ for k in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                     "MALLOC_TOP_PAD_")):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 2 ** 31 - 1), (m_top_pad, 1 << 28)):
        mallopt(option, value)


def collective_device() -> torch.device:
    """Where a tensor must be for torch.distributed calls: NCCL takes only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    """Tear down megatron's groups and the process group (the next `initialize` starts afresh)."""
    ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
