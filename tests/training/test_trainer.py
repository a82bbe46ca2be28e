import json
import os
import re

import pytest

from megatron_p2t.config import load_config
from megatron_p2t.training.trainer import deepspeed_config, lr_lambda, resolve_grad_accum, with_grad_accum
from tests.conftest import ROOT


def test_deepspeed_json_is_merged_into_the_generated_keys(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"overlap_comm": True},
                                                  "gradient_clipping": 0.5}))
    cfg = load_config(None, ["train.zero_stage=2", f"train.deepspeed_config={tmp_path}/ds.json", "train.grad_accum=4"])
    ds = deepspeed_config(cfg.train, micro_batch=8)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 8


def test_production_config_names_its_deepspeed_json_and_a_missing_one_is_an_error(tmp_path, monkeypatch):
    import os
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"))
    monkeypatch.chdir(ROOT)
    ds = deepspeed_config(cfg.train, micro_batch=cfg.data.batch_size)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    cfg.train.deepspeed_config = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        deepspeed_config(cfg.train, 1)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    f = lr_lambda(100, 0.06, 0.1)
    assert [round(f(s), 4) for s in (0, 5)] == [round(1 / 6, 4), 1.0]
    assert f(6) == pytest.approx(1.0) and f(53) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_global_batch_sets_accumulation_or_names_the_fix():
    cfg = load_config(None, ["train.global_batch=64"])
    assert resolve_grad_accum(cfg.train, micro_batch=8, dp=4) == 2
    assert with_grad_accum(cfg, micro_batch=8, dp=4).train.grad_accum == 2 and cfg.train.grad_accum == 1
    with pytest.raises(ValueError, match=r"global_batch=60 is not a multiple of data.batch_size x data-parallel "
                                         r"size = 8 x 4 = 32; use e.g. 32 or 64"):
        resolve_grad_accum(load_config(None, ["train.global_batch=60"]).train, 8, 4)
    with pytest.raises(ValueError, match="train.grad_accum=3 contradicts"):
        resolve_grad_accum(load_config(None, ["train.global_batch=64", "train.grad_accum=3"]).train, 8, 4)
    with pytest.raises(ValueError, match="data.max_tokens"):
        resolve_grad_accum(load_config(None, ["train.global_batch=64"]).train, None, 4)
    assert resolve_grad_accum(load_config(None, ["train.grad_accum=5"]).train, 8, 4) == 5


def test_setups_the_stages_cannot_run_are_refused_before_any_work(tmp_path, capsys):
    """ZeRO setups the trainer cannot step (pipeline or expert parallelism beside ZeRO 0/3; bf16 at ZeRO-1 with
    fp32 gradient accumulation, where DeepSpeed takes its BF16_Optimizer, under expert parallelism) and the stages'
    own refusals, the loader's among them: each an `error:` line and exit code 2 from the CLI, before a process
    group or a run directory."""
    import torch.distributed as dist
    from megatron_p2t.cli import main
    from megatron_p2t.training.trainer import check_optimizer
    cfg = os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml")
    run = [f"train.save_dir={tmp_path}/run"]
    moe = ["model.decoder=llama_moe", "parallel.expert=2"]
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}))
    stage3 = tmp_path / "stage3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cases = [
        (["instruct", "--config", cfg, *run, "parallel.pipeline=2", "train.zero_stage=0"],
         r"pipeline-parallel training \(parallel.pipeline=2\) reduces gradients through ZeRO: set train.zero_stage "
         r"to 1 or 2 \(it is 0\)"),
        (["instruct", "--config", cfg, *run, *moe, "train.zero_stage=1", f"train.deepspeed_config={stage3}"],
         r"expert parallelism \(parallel.expert=2\) trains the experts beside ZeRO: .*\(it is 3\)"),
        (["instruct", "--config", cfg, *run, *moe, "train.zero_stage=1", f"train.deepspeed_config={bf16}"],
         r"bf16 at ZeRO stage 1 with fp32 gradient accumulation .*bf16.json.*BF16_Optimizer.*train.zero_stage=2"),
        (["instruct", "--config", cfg, *run, "parallel.pipeline=2", "model.llm_lora.r=0"],
         "leaves the later pipeline stages nothing to train"),
        (["align", "--config", os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), *run, "parallel.pipeline=2"],
         r"stage 1 runs tensor x data parallel \(parallel.pipeline=1\)"),
        (["pretrain-lm", "--config", cfg, *run], r"trains a decoder-only recipe .*model.encoder=esm2"),
        (["instruct", "--config", cfg, *run, "data.text_tokenizer="], r"stage 2 needs data.text_tokenizer"),
        (["instruct", "--config", cfg, *run, "instruct.mix=[{path: qa.jsonl}]"],
         r"instruct.mix entries are \{manifest: PATH, weight: W\}, got \{'path': 'qa.jsonl'\}"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and re.search(message, err), (argv, err)
        assert not dist.is_initialized() and not os.path.exists(tmp_path / "run"), argv
    # what DeepSpeed steps with a ZeRO optimizer passes: ZeRO-2, or ZeRO-1 with the optimizer offloaded
    check_optimizer(load_config(cfg, [*moe, "train.zero_stage=2", f"train.deepspeed_config={bf16}"]), False, True)
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({**json.loads(bf16.read_text()),
                                   "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    check_optimizer(load_config(cfg, [*moe, "train.zero_stage=1", f"train.deepspeed_config={offload}"]), False,
                    True)


@pytest.mark.slow
def test_whole_steps_equal_micro_steps_and_a_nonfinite_step_is_skipped_on_every_rank(tmp_path):
    """Whole steps (the pipeline path: backward outside DeepSpeed, one coalesced ZeRO reduction) train exactly like
    engine.backward micro-steps at ZeRO-1 and ZeRO-2; a micro-batch that is non-finite on rank 1 only is skipped by
    both ranks, counted, and leaves the weights of a run that never saw it."""
    import subprocess
    import sys

    import torch
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "training", "dist_trainer_main.py"), "--work", str(tmp_path)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = torch.load(tmp_path / "results.pt")
    ref = res["micro-zero1-nan-1"]
    assert len(ref["losses"]) == 4 and ref["losses"][-1] < ref["losses"][0] and ref["skipped"] == 0
    for key, run in res.items():
        assert run["skipped"] == (0 if key.endswith("nan-1") else 1), key
        assert len(run["losses"]) == 4, key
        for name, w in ref["weights"].items():
            assert torch.allclose(run["weights"][name], w, rtol=1e-5, atol=1e-6), (key, name)
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) <= 1e-6, (key, run["losses"])
