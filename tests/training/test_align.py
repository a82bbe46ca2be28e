"""Stage 1 end to end on the shared sample's shards with tiny random models (CPU, gloo)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, STAGE1_STEPS, free_port, losses as _losses, same_run

pytestmark = pytest.mark.slow


def _align(nproc, overrides, *extra, background=False):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "megatron_p2t", "align", "--config", os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), *overrides,
           *extra]
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_kill_9_then_resume_auto_continues_bit_exactly(stage1_job, tmp_path):
    root, ov = stage1_job
    proc = _align(2, ov + [f"train.save_dir={tmp_path}/b"], background=True)
    log = tmp_path / "b" / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 6:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_losses(tmp_path / "b")) < STAGE1_STEPS, "the kill came too late"
    latest = (tmp_path / "b" / "latest").read_text()
    assert latest.startswith("step") and not any(n.endswith(".tmp") and (tmp_path / "b" / n / "COMPLETE").exists()
                                                 for n in os.listdir(tmp_path / "b"))
    _align(2, ov + [f"train.save_dir={tmp_path}/b"], "--resume", "auto")
    same_run(tmp_path / "b", root / "torchrun")
    summary = json.load(open(tmp_path / "b" / "summary.json"))
    assert summary["resumed"] and summary["step"] == STAGE1_STEPS and summary["eval"]["n"] == 44


def test_resume_refuses_another_model_shape_or_world_size_before_training(stage1_job, tmp_path):
    root, ov = stage1_job
    shutil.copytree(root / "torchrun", tmp_path / "r")   # a finished run's checkpoints, resumed for 4 more steps
    ov = ov + [f"train.save_dir={tmp_path}/r"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = ["-m", "megatron_p2t", "align", "--resume", "auto", "--config",
           os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), *ov, f"train.steps={STAGE1_STEPS + 4}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(torchrun + cmd + ["model.projector.intermediate_dim=32"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "holds a different model: parameter connector.fc1.weight is [64, " in r.stderr, r.stderr[-3000:]
    r = subprocess.run([sys.executable] + cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr[-3000:]
    assert "was written by 2 processes, this run has 1" in r.stderr, r.stderr[-3000:]
    r = subprocess.run(torchrun + cmd + ["train.global_batch=24"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "global_batch=24 is not a multiple of" in r.stderr, r.stderr[-3000:]
    assert _losses(tmp_path / "r") == _losses(root / "torchrun")  # the refused runs trained nothing


def test_a_dead_rank_ends_the_job_promptly_naming_it_and_resume_continues(stage1_job, tmp_path):
    import psutil
    root, ov = stage1_job
    ov = ov + ["train.steps=400", "train.save_every=2", f"train.save_dir={tmp_path}/k"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "megatron_p2t", "align", "--config",
                             os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), *ov], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = tmp_path / "k" / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    # the agent's own children are the ranks; what a rank starts (loader workers, torch's compile workers under
    # DeepSpeed 0.19.1) inherits its RANK
    victim = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    assert len(victim) == 1
    victim[0].kill()
    t0 = time.time()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert "rank      : 1 (local_rank: 1)" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]
    done = len(_losses(tmp_path / "k"))
    assert done < 400
    _align(2, ov + ["train.steps=" + str(done + 2)], "--resume", "auto")
    assert len(_losses(tmp_path / "k")) == done + 2
    assert json.load(open(tmp_path / "k" / "summary.json"))["resumed"]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_checkpoints_and_exits_cleanly(stage1_job, tmp_path, sig):
    _, ov = stage1_job
    # the training process itself (a world of one): launchers' own agents exit non-zero when signalled
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_p2t", "align", "--config",
                             os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), *ov,
                             f"train.save_dir={tmp_path}/s", "train.steps=400", "train.save_every=1000"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "s"
    log = root / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    tag = (root / "latest").read_text()
    assert (root / tag / "COMPLETE").exists() and int(tag[4:]) >= 3 and "signal received" in err


def test_deepspeed_launcher_runs_launch_align_sh_like_torchrun(stage1_job, tmp_path):
    """`deepspeed launch/align.sh` (the file is bash and Python at once) gives torchrun's losses exactly."""
    root, ov = stage1_job
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/align.sh",
                        "--config", "configs/align_tiny_cpu.yaml", *ov, f"train.save_dir={tmp_path}/d"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    same_run(tmp_path / "d", root / "torchrun")
    r = subprocess.run(["bash", "launch/align.sh", "--config", "configs/align_tiny_cpu.yaml", *ov,
                        "train.steps=2", f"train.save_dir={tmp_path}/one"], env=dict(env, PYTHON=sys.executable),
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(tmp_path / "one")) == 2


def test_held_out_retrieval_well_above_chance_when_the_text_is_in_the_sequence(stage1_job, family_data, tmp_path):
    """The whole stage (data_tools shards, DP=2 gathered negatives, trainer, validation retrieval) learns: on
    tests/synthetic.py's families, held-out members retrieve their family's text. Real held-out SwissProt
    entries are at chance with random towers (no homolog in train, no biology in the encoder): see the README."""
    root, ov = stage1_job
    out, _ = family_data
    ov = [o for o in ov if not o.startswith(("data.manifest", "train.s"))]
    _align(2, ov + [f"data.manifest={out}/manifest.json", "train.steps=150", "train.save_every=1000",
                    f"train.save_dir={tmp_path}/fam"])
    ev = json.load(open(tmp_path / "fam" / "summary.json"))["eval"]
    assert ev["n"] == 40 and ev["chance_top1"] == 1 / 40
    assert ev["top1"] >= 0.4 and ev["top5"] >= 0.8, ev


def test_zero_stage_2_gives_zero_stage_1_losses(stage1_job, tmp_path):
    """ZeRO-2 partitions gradients as well as optimizer state over the DP group; the update must not change."""
    root, ov = stage1_job
    assert "zero_stage: 1" in open(os.path.join(ROOT, "configs", "align_tiny_cpu.yaml")).read()  # the reference's
    _align(2, ov + [f"train.save_dir={tmp_path}/z2", "train.zero_stage=2", "train.save_every=1000"])
    import numpy as np
    np.testing.assert_allclose(_losses(tmp_path / "z2"), _losses(root / "torchrun"), rtol=1e-6, atol=1e-7)
