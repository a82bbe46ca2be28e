"""The device script runs between GPU loans: `bench/gpu/run.sh --tiny` takes every code path of the GPU run
(bf16 vs fp32, the packed attention kernels, both stage-2 implementations, stage 1 with and without the text
cache, the structure-aware encoder, the MoE decoder, the fused kernels, the report) at toy shapes on the CPU."""
import json
import os
import subprocess
import sys

import pytest

from megatron_p2t.parallel.launch_env import RENDEZVOUS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_device_script_runs_tiny_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    p = subprocess.run(["bash", "bench/gpu/run.sh", "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(tmp_path / "check.json"))
    prec = res["precision"]
    # bf16 keeps ~3 significant digits: the mean loss agrees far closer than single logits and gradients
    assert prec["loss_rel_error"] < 1e-2 and prec["logits_rel_error"] < 5e-2 and prec["grads_rel_error"] < 5e-2
    assert prec["grads_rel_error"] > 0  # the bf16 model really ran in bf16
    att = res["attention"]
    assert att["auto_kernel"] == "sdpa" and att["failed_kernels"] == []     # the varlen kernels need CUDA
    assert att["sdpa"]["rel_error_vs_cpu_fp32"] == att["sdpa"]["grad_rel_error_vs_cpu_fp32"] == 0
    assert att["dense_block_mask"]["rel_error_vs_cpu_fp32"] < 1e-5
    assert att["dense_block_mask"]["grad_rel_error_vs_cpu_fp32"] < 1e-5 and att["sdpa"]["fwd_bwd_ms"] > 0
    s2 = res["stage2"]
    assert s2["attention_kernel"] == "sdpa"
    for impl in ("ours_packed", "hf_peft_padded"):
        assert s2[impl]["tokens_per_s"] > 0 and s2[impl]["flops_per_step"] > 0 and s2[impl]["steps_timed"] >= 1
        assert s2[impl]["host_syncs"] is None                           # counted on CUDA only
    assert s2["ours_packed"]["rows"] < s2["hf_peft_padded"]["rows"]  # packing really packed
    s1 = res["stage1"]
    assert s1["text_cache"]["samples_per_s"] > 0 and s1["text_computed"]["flops_per_step"] > \
        s1["text_cache"]["flops_per_step"]
    assert s1["text_cache_padded"]["samples_per_s"] > 0 and 0 < s1["padding_fraction"] < 1
    assert s1["attention_kernel"] == "sdpa"
    st = res["structure"]
    assert st["precision"]["out_rel_error"] < 5e-2 and 0 < st["precision"]["grads_rel_error"] < 0.1
    assert st["plain"]["step_s"] > 0 and st["bias"]["step_s"] > 0 and st["plain_unfused"]["step_s"] > 0
    mo = res["moe"]
    assert 0 < mo["precision"]["logits_rel_error"] < 5e-2 and 0 < mo["precision"]["expert_grads_rel_error"] < 0.1
    assert mo["moe"]["params"] > mo["dense"]["params"] and mo["moe"]["step_s"] > 0
    fu = res["fusion"]
    assert fu["loss_rel_error"] < 1e-5 and fu["grads_rel_error"] < 1e-4 and fu["fused"]["step_s"] > 0
    md = (tmp_path / "check.md").read_text()
    for heading in ("Precision", "Packed attention", "Stage 2 step", "Stage 1 step", "Ratio: ours / HF + PEFT",
                    "Structure-aware encoder", "Mixture-of-experts decoder", "Fused kernels"):
        assert heading in md


def _check_with(tmp_path, injected: str, *sections: str):
    """The device check at toy shapes over `sections`, after `injected` (code that breaks something) ran; its exit
    code, stderr, check.json and check.md."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    script = (f"import sys, bench.gpu.check as c\n{injected}\n"
              f"sys.exit(c.main(['--tiny', '--out', {str(tmp_path)!r}, '--only', *{list(sections)!r}]))\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stderr, json.load(open(tmp_path / "check.json")), (tmp_path / "check.md").read_text()


def test_a_failing_section_spares_the_others_and_fails_the_run(tmp_path):
    """A short loan is not lost to one section's error: the others still run and report, the failure is in
    check.json and check.md, and the command exits non-zero."""
    rc, err, res, md = _check_with(
        tmp_path, "def boom(shapes):\n    raise RuntimeError('CUDA out of memory (injected)')\n"
                  "c.check_attention = boom", "attention", "structure")
    assert rc == 1, err[-3000:]
    assert res["attention"]["error"] == "RuntimeError: CUDA out of memory (injected)"
    assert "boom" in res["attention"]["traceback"]
    assert res["structure"]["bias"]["step_s"] > 0            # the section after it ran
    assert "**attention: failed**" in md and "Structure-aware encoder" in md
    assert "failed sections: attention" in err


def test_a_kernel_failing_in_the_attention_section_is_kept_out_of_the_step(tmp_path):
    """A varlen kernel that fails on the lent GPU (say torch's, on a release whose signature moved again) is
    reported with its error, fails the run, and stage 2 is measured with SDPA per sample instead of failing too."""
    rc, err, res, md = _check_with(
        tmp_path, "from megatron_p2t.transformer import attention\n"
                  "def boom(*a, **k):\n    raise TypeError('varlen_attn() got an unexpected keyword (injected)')\n"
                  "attention.varlen_kernels = lambda query, p: {'torch_varlen': boom}", "attention", "stage2")
    assert rc == 1, err[-3000:]
    att = res["attention"]
    assert att["auto_kernel"] == "torch_varlen" and att["failed_kernels"] == ["torch_varlen"]
    assert "unexpected keyword (injected)" in att["torch_varlen"]["error"] and att["sdpa"]["ms"] > 0
    assert res["stage2"]["attention_kernel"] == "sdpa" and res["stage2"]["ours_packed"]["tokens_per_s"] > 0
    assert "| torch_varlen | failed: `TypeError" in md and "attention: sdpa)" in md
    assert "failed sections: attention" in err
