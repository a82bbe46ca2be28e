import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_quickstart_is_the_readme_main_job(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "quickstart", "--out", str(tmp_path / "qs"),
                        "--align-steps", "6", "--instruct-steps", "6"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    # stage 1 -> stage 2 -> export (verified) -> generate -> evaluate, with the baseline in the same table
    rep = json.load(open(tmp_path / "qs" / "report" / "scores.json"))
    assert rep["n"] == 44 and set(rep["systems"]) == {"predictions", "mmseqs_nearest_neighbour"}
    exported = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{"out"')][0]
    assert exported["max_abs_logit_diff"] <= 1e-4
    assert "0 of 88 held-out sequences have a train neighbour" in r.stderr
    passes = [json.loads(l.split(":", 1)[1]) for l in r.stdout.splitlines() if l.startswith("stream")]
    assert passes[0]["samples"] == 789 and passes[1]["batches"] == 50
    assert 0 < passes[1]["padding_fraction"] < passes[0]["padding_fraction"]


def test_data_check_cli(built_sample, tiny_tokenizer):
    out, _ = built_sample
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "data-check", "--config",
                        f"{ROOT}/configs/sample_cpu.yaml", f"data.manifest={out}/manifest.json",
                        f"data.text_tokenizer={tiny_tokenizer}", "data.batch_size=8", "data.max_tokens=",
                        "data.num_workers=0", "data.split=test"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["samples"] == 44 and rep["batches"] == 6


def test_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "data-check", "--config",
                        f"{ROOT}/configs/sample_cpu.yaml", "--max-batches", "3",
                        f"data.manifest={tmp_path}/none.json"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "data_tools build" in r.stderr


def test_endless_stream_needs_a_bound(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "data-check", "--config",
                        f"{ROOT}/configs/sample_cpu.yaml"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--max-batches" in r.stderr


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_training_stages_accept_the_deepspeed_launchers_local_rank(tmp_path, stage):
    """`deepspeed launch/<stage>.sh` appends --local_rank=N: it must reach the config, not an argparse error."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", stage, "--config", str(tmp_path / "none.yaml"),
                        "--local_rank=0"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "unrecognized arguments" not in r.stderr and "none.yaml" in r.stderr, r.stderr
