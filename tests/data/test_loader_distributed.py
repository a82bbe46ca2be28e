"""The loader under real multi-process launches (torchrun, gloo)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, split_keys

pytestmark = pytest.mark.slow


def _torchrun(tmp_path, built_sample, tokenizer, nproc, *extra):
    out, _ = built_sample
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "data", "dist_loader_main.py"), "--manifest",
           os.path.join(out, "manifest.json"), "--tokenizer", tokenizer, "--out", str(tmp_path), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.load(open(tmp_path / f"rank{i}.json")) for i in range(nproc)]




def _valid(batches):
    return [k for b in batches for k, v in zip(b["keys"], b["valid"]) if v]


def test_dp2_two_workers_exactly_once(tmp_path, built_sample, tiny_tokenizer):
    ranks = _torchrun(tmp_path, built_sample, tiny_tokenizer, 2, "--workers", "2")
    assert [r["dp"] for r in ranks] == [[0, 2], [1, 2]]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"])
    keys = _valid(ranks[0]["batches"]) + _valid(ranks[1]["batches"])
    assert sorted(keys) == split_keys(built_sample)


def test_tp2_peers_get_identical_batches(tmp_path, built_sample, tiny_tokenizer):
    ranks = _torchrun(tmp_path, built_sample, tiny_tokenizer, 2, "--tp", "2")
    assert [r["dp"] for r in ranks] == [[0, 1], [0, 1]]
    assert ranks[0]["batches"] == ranks[1]["batches"]
    assert sorted(_valid(ranks[0]["batches"])) == split_keys(built_sample)


def test_dp2_resume_mid_epoch_yields_the_remaining_samples(tmp_path, built_sample, tiny_tokenizer):
    ranks = _torchrun(tmp_path, built_sample, tiny_tokenizer, 2, "--workers", "2", "--resume-after", "17")
    seen = []
    for r in ranks:
        assert len(r["batches"]) == 18
        seen += _valid(r["batches"]) + _valid(r["resumed"])
    assert sorted(seen) == split_keys(built_sample)
    assert len(ranks[0]["resumed"]) == len(ranks[1]["resumed"])
