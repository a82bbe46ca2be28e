import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


BASELINES = ("mmseqs_nearest_neighbour", "blast_nearest_neighbour")


@pytest.mark.slow
def test_quickstart_is_the_readme_main_job(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "quickstart", "--out", str(tmp_path / "qs"),
                        "--align-steps", "6", "--instruct-steps", "6"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    # stage 1 -> stage 2 -> export (verified) -> generate -> evaluate, with both baselines in the same table
    rep = json.load(open(tmp_path / "qs" / "report" / "scores.json"))
    assert rep["n"] == 44 and set(rep["systems"]) == {"predictions", *BASELINES}
    exported = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{"out"')][0]
    assert exported["max_abs_logit_diff"] <= 1e-4
    assert "0 of 88 held-out sequences have a train neighbour" in r.stderr
    passes = [json.loads(l.split(":", 1)[1]) for l in r.stdout.splitlines() if l.startswith("stream")]
    assert passes[0]["samples"] == 789 and passes[1]["batches"] == 50
    assert 0 < passes[1]["padding_fraction"] < passes[0]["padding_fraction"]
    # the other recipe on the same data (reused): feature alignment of the resampler, LoRA tuning, the same report
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "quickstart", "--out", str(tmp_path / "qs"),
                        "--recipe", "protein2text", "--align-steps", "6", "--instruct-steps", "6"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing 877 cleaned records" in r.stdout + r.stderr
    p2t = tmp_path / "qs" / "protein2text"
    assert json.load(open(p2t / "align" / "megatron_p2t.json"))["stage"] == "align-feature"
    rep = json.load(open(p2t / "report" / "scores.json"))
    assert rep["n"] == 44 and set(rep["systems"]) == {"predictions", *BASELINES}
    exported = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{"out"')][0]
    assert exported["max_abs_logit_diff"] <= 1e-4
    info = json.load(open(p2t / "export" / "megatron_p2t.json"))
    assert info["connector"] == "resampler" and info["resampler"]["latents"] == 16


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


def test_a_missing_or_unfinished_checkpoint_is_named_with_the_fix(tmp_path, capsys):
    """export --checkpoint names the directory, says what is wrong with it (absent; a step without its COMPLETE
    marker, which `latest` names) and what to pass instead, before any process group or model exists."""
    from megatron_p2t.cli import main
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nowhere'}: no such directory;") and "--checkpoint" in err, err
    (tmp_path / "run" / "step00000004").mkdir(parents=True)
    (tmp_path / "run" / "latest").write_text("step00000004")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run' / 'step00000004'}: not a complete checkpoint (no COMPLETE marker" in err, err
    assert "a run's train.save_dir or one of its stepN directories" in err and not (tmp_path / "hf").exists()


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


def test_commands_refuse_a_checkpoint_of_another_recipe_before_any_work(tmp_path, capsys):
    """Protein2Text's config pointed at Prot2Text-V2's stage-1 run: stage 2 from it, resuming it, caching H-SCALE's
    text side for a feature-alignment config, exporting an H-SCALE run -- each an `error:` line, exit code 2,
    before a process group, a model or a run directory exists."""
    from megatron_p2t.cli import main
    from tests.test_config import _run_dir
    hscale = _run_dir(tmp_path / "align", [], "align")
    os.makedirs(os.path.join(hscale, "step00000005"))
    open(os.path.join(hscale, "step00000005", "COMPLETE"), "w").close()
    open(os.path.join(hscale, "latest"), "w").write("step00000005")
    cfg = f"{ROOT}/configs/protein2text_tiny_cpu.yaml"
    cases = [(["instruct", "--config", cfg, f"instruct.init_from={hscale}", f"train.save_dir={tmp_path}/run"],
              "instruct.init_from=.*model.connector=mlp there, resampler here"),
             (["align", "--config", cfg, f"train.save_dir={hscale}", "--resume", "auto"],
              "--resume=.*model.connector=mlp there, resampler here"),
             (["cache-text", "--config", cfg], "cache-text precomputes H-SCALE's text side.*feature alignment"),
             (["export", "--checkpoint", hscale, "--out", str(tmp_path / "hf")],
              "H-SCALE stage-1 run.*export the stage-2 run")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and re.search(message, err), (argv, err)
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "hf")


def test_a_command_sets_up_its_process_group_without_a_compiler_and_leaves_it(tmp_path, monkeypatch, built_sample,
                                                                              tiny_tokenizer):
    """cache-text once exited with its gloo group alive and its peer aborted at interpreter shutdown (CI,
    "terminate called without an active exception"): every command that succeeds leaves the group, through a
    barrier, before the process ends. Starting the group compiles nothing: DeepSpeed's CPU backend would JIT-build
    its inference-only shared-memory op (25-40 s of g++ on a fresh machine) into TORCH_EXTENSIONS_DIR."""
    import deepspeed.ops
    import torch.distributed as dist
    from megatron_p2t.cli import main
    from tests.conftest import free_port
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)  # as a fresh process has it
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(tmp_path / "tiny")]) == 0
    out, _ = built_sample
    data = tmp_path / "data"
    os.makedirs(data)
    for name in set(os.listdir(out)) - {"text_cache"}:  # the cache goes beside the manifest, not into the shared build
        os.symlink(os.path.join(out, name), data / name)
    assert main(["cache-text", "--config", os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"),
                 f"data.manifest={data}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
                 f"model.encoder_path={tmp_path}/tiny/esm", f"model.llama={tmp_path}/tiny/llama"]) == 0
    assert not dist.is_initialized()
    assert os.path.exists(next((data / "text_cache").iterdir()) / "cache.json")
    assert not os.path.exists(tmp_path / "torch_extensions")


def test_overrides_before_and_after_an_option_all_count(monkeypatch):
    """`align --config C a=b --resume auto c=d` (an sbatch script's defaults, then the user's words after its own
    options) was refused as unrecognized arguments."""
    import dataclasses

    from megatron_p2t import cli
    from megatron_p2t.cli.table import COMMANDS
    seen = {}
    monkeypatch.setitem(COMMANDS, "align", dataclasses.replace(COMMANDS["align"],
                                                               handler=lambda a: seen.update(vars(a)) or 1))
    assert cli.main(["align", "--config", "c.yaml", "train.lr=1e-4", "--resume", "auto", "train.steps=3"]) == 1
    assert seen["overrides"] == ["train.lr=1e-4", "train.steps=3"] and seen["resume"] == "auto"
    with pytest.raises(SystemExit):
        cli.main(["align", "--config", "c.yaml", "--resume", "auto", "--bogus"])
