"""The CPU redirects: what megatron-core hard-codes must work here, and nothing is touched where CUDA exists."""
import subprocess
import sys

import pytest

from megatron_p2t.parallel.layout import LayoutError, check_layout
from tests.conftest import ROOT

PROBE = r"""
import torch
from megatron_p2t.parallel import cpu_shim
assert cpu_shim.enable() and cpu_shim.enable()            # idempotent
t = torch.zeros(3, device="cuda")                          # as pipeline schedules allocate
assert t.device.type == "cpu"
assert torch.empty(2, device=torch.device("cuda")).device.type == "cpu"
torch.cuda.synchronize()
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core import parallel_state as ps
import torch.distributed as dist
import tempfile
dist.init_process_group("gloo", init_method="file://" + tempfile.mkdtemp() + "/store", rank=0, world_size=1)
ps.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(7)
torch.manual_seed(0)
before = torch.rand(2)
with get_cuda_rng_tracker().fork():                       # attention always forks the tracker
    a = torch.rand(3)
after = torch.rand(2)
model_parallel_cuda_manual_seed(7)
torch.manual_seed(0)
torch.rand(2)
with get_cuda_rng_tracker().fork():
    b = torch.rand(3)
torch.manual_seed(0); torch.rand(2); plain_next = torch.rand(2)
assert torch.equal(a, b), "forked regions are reproducible"
assert torch.equal(after, plain_next), "the fork restores the default generator's state"
print("ok")
"""


def test_megatron_cuda_paths_run_on_cpu():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_nothing_is_patched_when_cuda_exists(monkeypatch):
    import torch
    from megatron_p2t.parallel import cpu_shim
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    assert cpu_shim.enable() is False and torch.cuda.current_device is before


def test_layout_must_divide_the_world():
    assert check_layout(8, 2, 2) == 2
    with pytest.raises(LayoutError, match="2 x 3 = 6 does not divide the world size 8"):
        check_layout(8, 2, 3)
