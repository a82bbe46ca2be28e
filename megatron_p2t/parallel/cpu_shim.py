"""Run megatron-core on machines without CUDA (development, CI). Active only when CUDA is absent.

megatron-core hard-codes CUDA in a few places it assumes every run has a GPU:
- the tensor-parallel RNG tracker saves/restores CUDA generator states (tensor_parallel/random.py), and
  attention always forks it, so even dropout-free models need it;
- rotary embeddings, the global memory buffer used by attention, and pipeline p2p allocate on
  `torch.cuda.current_device()` and call `torch.cuda.synchronize()`;
- pipeline schedules allocate `torch.zeros(..., device="cuda")`.
On a CPU-only machine these would raise. `enable()` maps them to the CPU: the RNG tracker swaps the CPU
generator's state (so forked regions stay reproducible), `current_device()` names the CPU, `synchronize()`
does nothing, and a TorchFunctionMode rewrites device="cuda" in tensor factories to the CPU.
On a machine with CUDA, `enable()` does nothing. Nothing else in the code base knows this module exists.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and (dev == "cuda" or (isinstance(dev, torch.device) and dev.type == "cuda")):
            kwargs = dict(kwargs, device="cpu")
            kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


def enable() -> bool:
    """Install the redirects if CUDA is unavailable; idempotent. Returns whether they are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # the tracker warns when the CPU generator changes inside a forked region; here the forked "CUDA" generator
    # is the CPU one, so any dropout in such a region (LoRA on a row-parallel layer) would log it every step
    logging.getLogger(mp_random.__name__).addFilter(
        lambda r: "CPU RNG state changed within GPU RNG context" not in r.getMessage())
    _CudaToCpu().__enter__()  # for the life of the process, on this thread
    _enabled = True
    return True
