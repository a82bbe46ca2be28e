import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_p2t.models.pooling import masked_mean_std
from megatron_p2t.training.loss import hscale_loss, hscale_scores, info_nce, rank_of_own, retrieval_accuracy
from tests.conftest import ROOT


def test_info_nce_by_hand():
    torch.manual_seed(0)
    q, k = torch.randn(5, 7), torch.randn(5, 7)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    want = -sum(math.log(math.exp(float(qn[i] @ kn[i]) / 0.05) /
                         sum(math.exp(float(qn[i] @ kn[j]) / 0.05) for j in range(5))) for i in range(5)) / 5
    assert abs(float(info_nce(q, k, 0.05)) - want) < 1e-5


def test_masked_mean_std_ignores_padding():
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mean, std = masked_mean_std(x, mask, eps=0.0)
    assert torch.allclose(mean[0], x[0, :3].mean(0)) and torch.allclose(std[0], x[0, :3].std(0, unbiased=False))
    assert torch.allclose(std[1], x[1].std(0, unbiased=False))


def test_variants_combine_as_specified():
    torch.manual_seed(1)
    pm, ps, tm, ts = (torch.randn(4, 6) for _ in range(4))
    paper = hscale_loss(pm, ps, tm, ts, 0.05, weights=(0.7, 0.3))
    assert torch.allclose(paper, 0.7 * info_nce(pm, tm, 0.05) + 0.3 * info_nce(ps, ts, 0.05))
    concat = hscale_loss(pm, ps, tm, ts, 0.05, variant="concat")
    assert torch.allclose(concat, info_nce(torch.cat([pm, ps], -1), torch.cat([tm, ts], -1), 0.05))
    with pytest.raises(ValueError, match="variant"):
        hscale_loss(pm, ps, tm, ts, 0.05, variant="nope")


def test_retrieval_accuracy():
    k, std = torch.eye(4), torch.ones(4, 4)
    assert float(retrieval_accuracy(k.clone(), std, k, std)) == 1.0
    assert float(retrieval_accuracy(k[[1, 0, 2, 3]], std, k, std)) == 0.5
    assert float(retrieval_accuracy(k[[1, 0, 2, 3]], std, k, std, k=4)) == 1.0


def test_retrieval_scores_as_the_loss_weighs():
    torch.manual_seed(2)
    pm, ps, tm, ts = (torch.randn(5, 6) for _ in range(4))
    cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()  # noqa: E731
    assert torch.allclose(hscale_scores(pm, ps, tm, ts, (0.7, 0.3)), 0.7 * cos(pm, tm) + 0.3 * cos(ps, ts))
    assert torch.allclose(hscale_scores(pm, ps, tm, ts, variant="concat"),
                          cos(torch.cat([pm, ps], -1), torch.cat([tm, ts], -1)))
    # Near-collinear, large std vectors (a frozen tower's) must not drown the means the paper's loss weighs 0.7.
    ts_big = 20.0 + torch.randn(5, 6)
    ps_big = ts_big[[1, 2, 3, 4, 0]]
    assert (rank_of_own(hscale_scores(tm, ps_big, tm, ts_big)) == 0).all()
    assert (rank_of_own(hscale_scores(tm, ps_big, tm, ts_big, variant="concat")) > 0).any()
    assert rank_of_own(torch.tensor([[0.0, 0.5, 0.2, 0.9]]), offset=2).tolist() == [2]


@pytest.mark.slow
def test_dp2_gathered_negatives_equal_one_process():
    import tempfile
    out = tempfile.mkdtemp()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "training", "dist_loss_main.py"), out],
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        res = json.load(open(os.path.join(out, f"rank{rank}.json")))
        assert len(res) == 4
        for case, v in res.items():
            assert v["loss_diff"] <= 1e-6 and v["grad_diff"] <= 1e-6 and v["temp_grad_diff"] <= 1e-6, (case, v)
