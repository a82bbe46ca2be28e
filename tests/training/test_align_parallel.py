import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_dp2_tp2_and_text_cache_equal_one_process(tmp_path, built_sample, tiny_tokenizer):
    from megatron_p2t.cli import main
    from megatron_p2t.models.tiny import make_projector
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(tmp_path / "tiny")]) == 0
    make_projector(str(tmp_path / "proj"), esm_hidden=48, inter=64, out=64)  # identical weights at every layout
    out, _ = built_sample
    ov = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}", "data.batch_size=8",
          f"model.encoder_path={tmp_path}/tiny/esm", f"model.llama={tmp_path}/tiny/llama",
          f"model.connector_weights={tmp_path}/proj"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    run = lambda *args: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", *args], env=env, cwd=ROOT, capture_output=True,
                                       text=True, timeout=600)
    for tp, cache, lora in ((1, False, False), (2, False, False), (1, True, False), (1, False, True)):
        if cache:  # the text side computed once, by two data-parallel ranks
            r = run("-m", "megatron_p2t", "cache-text", "--config", os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"),
                    *ov)
            assert r.returncode == 0, r.stderr[-4000:]
            assert json.loads(r.stdout.strip().splitlines()[-1])["samples"] == 877
        r = run(os.path.join(ROOT, "tests", "training", "dist_align_main.py"), "--tp", str(tp), "--work",
                str(tmp_path), *(["--cache"] if cache else []), *(["--lora"] if lora else []), *ov)
        assert r.returncode == 0, r.stderr[-4000:]
        for rank in range(2):
            res = json.load(open(tmp_path / f"tp{tp}{'_cache' if cache else ''}{'_lora' if lora else ''}"
                                             f"_rank{rank}.json"))
            for variant, v in res.items():
                assert v["loss_diff"] <= 1e-6 and v["grad_diff"] <= 1e-6, (tp, cache, variant, v)
                if lora:  # ESM's attention LoRA (2 layers x qkv/proj x A/B) trains under the gather, ESM recomputed
                    assert v["lora_grads"] == 3 * 2 * 2 and v["lora_grad_rel_diff"] <= 1e-5, v
                    assert v["esm_layers_recomputed"] == 3, v
                elif tp == 2 or cache:
                    assert v["vs_tp1_loss"] <= 1e-6 and v["vs_tp1_grad"] <= 1e-6, (tp, cache, variant, v)
