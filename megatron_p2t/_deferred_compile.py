"""megatron-core decorates its fusion kernels (bias-GeLU, bias-SwiGLU, bias-dropout-add, MoE routing helpers) with
`torch.compile` when its modules are imported, and DeepSpeed's Muon module (which its engine imports to check the
optimizer, whichever optimizer a run uses) does the same. Decorating compiles nothing, torch compiles on the first
call, but it imports torch._dynamo, torch._inductor and the compiler stack behind them. Measured on the 2-core
CPU machine: importing the trainer took 5.0 s user with them, 2.6 s without; a training process still imports
torch._dynamo (torch.optim's constructor does), and saves about 1.2-1.5 s. Launchers and tests start many such
processes, and most never call a fused kernel (this package's configs turn the fusions off).

While those modules are imported, `torch.compile` is swapped for a version that calls the real one on the
function's first call. Compilation therefore happens when it always did, on first use, with the same arguments;
only the compiler's import moves there with it. Modules and classes go to `torch.compile` at once. `torch.compile`
is restored when the module's import ends. `install()` is called from the package's `__init__`, so it is in place
before any module here imports megatron-core or DeepSpeed's engine; it imports nothing itself.
"""
from __future__ import annotations

import functools
import importlib.abc
import sys

# the modules whose import binds torch.compile decorators (megatron.core binds `megatron.core.jit.jit_fuser`, which
# its later-imported modules use too). DeepSpeed decorates with `jit_script_compat` (torch.compile) at import: FPDT's
# layer, and in 0.19.1 (not 0.19.8) its MoE gating and MiCS helpers, which its engine imports
_TARGETS = frozenset({"megatron.core", "deepspeed.runtime.zero.muon.original_muon", "deepspeed.moe.sharded_moe",
                      "deepspeed.runtime.zero.mics_utils", "deepspeed.sequence.fpdt_layer"})


def _deferred(compile_fn):
    """`torch.compile` with the same signature, as a function decorator, whose real call waits for first use."""
    def compile_later(model=None, **kwargs):
        if model is None:  # @torch.compile(mode=...) form
            return lambda fn: compile_later(fn, **kwargs)
        if not callable(model) or isinstance(model, type) or hasattr(model, "parameters"):
            return compile_fn(model, **kwargs)  # modules and classes: nothing to defer, keep torch's object
        compiled = []

        @functools.wraps(model)
        def first_call_compiles(*args, **kw):
            if not compiled:
                compiled.append(compile_fn(model, **kwargs))
            return compiled[0](*args, **kw)
        return first_call_compiles
    return compile_later


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        import torch
        real = torch.compile
        torch.compile = _deferred(real)
        try:
            self._loader.exec_module(module)
        finally:
            torch.compile = real


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _TARGETS:
            return None
        for finder in sys.meta_path:  # the spec the import would have found, with its loader wrapped
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
