"""megatron-core's (and DeepSpeed's Muon module's) torch.compile decorators wait for first use: importing them
through this package does not import the compiler, a decorated function still compiles (once, with its
arguments) when first called, and torch.compile itself is left as it was."""
import subprocess
import sys

import torch

from megatron_p2t import _deferred_compile
from tests.conftest import ROOT

PROBE = r"""
import sys, torch
real = torch.compile
import megatron_p2t.training.trainer, megatron_p2t.models.llama_moe
from megatron.core import jit
from megatron.core.fusions import fused_bias_swiglu
import deepspeed.runtime.zero.muon.original_muon as muon   # DeepSpeed's engine imports it for every optimizer
import inspect, megatron.core
assert inspect.getsource(megatron.core) and muon.zeropower_via_newtonschulz5.__name__ == "zeropower_via_newtonschulz5"
assert torch.compile is real, "restored after megatron.core's import"
assert jit.jit_fuser is not real and jit.jit_fuser.__qualname__.startswith("_deferred")
assert "torch._inductor.compile_fx" not in sys.modules, "nothing imported the compiler"
print("ok")
"""


def test_importing_megatron_core_leaves_the_compiler_unimported():
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_a_deferred_function_compiles_on_its_first_call_with_its_arguments():
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return lambda *a, **k: ("compiled", model(*a, **k))

    deferred = _deferred_compile._deferred(fake_compile)

    @deferred
    def gelu_plus(x, bias):
        return x + bias

    @deferred(mode="max-autotune-no-cudagraphs")
    def twice(x):
        return 2 * x

    assert calls == [] and gelu_plus.__name__ == "gelu_plus"
    assert gelu_plus(1, bias=2) == ("compiled", 3) and gelu_plus(2, bias=2) == ("compiled", 4)
    assert twice(3) == ("compiled", 6)
    assert calls == [{}, {"mode": "max-autotune-no-cudagraphs"}]  # once each, with the decorator's arguments
    deferred(torch.nn.Linear(2, 2))
    assert len(calls) == 3  # a module goes to torch.compile at once: its OptimizedModule is what callers expect


def test_the_real_compiler_runs_on_first_call():
    deferred = _deferred_compile._deferred(torch.compile)
    fn = deferred(lambda x: torch.nn.functional.gelu(x) * 2, backend="eager")
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), torch.nn.functional.gelu(x) * 2)
