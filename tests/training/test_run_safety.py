"""Two starts of one job, a fresh start into a used train.save_dir and a lost `latest`, with the real CLI: nothing
is lost and each refusal names its cause and the way forward."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_run_directory_is_held_by_one_job_and_never_clobbered(built_sample, tiny_tokenizer, tmp_path):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    data, _ = built_sample
    vocab = len(load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(tmp_path / "llama"), vocab=vocab + (-vocab) % 8)
    tiny.make_esm(str(tmp_path / "esm"))
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "megatron_p2t", "align", "--config",
           os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), f"data.manifest={data}/manifest.json",
           f"data.text_tokenizer={tiny_tokenizer}", f"model.encoder_path={tmp_path}/esm",
           f"model.llama={tmp_path}/llama", f"train.save_dir={run_dir}", "train.save_every=5",
           "train.tensorboard=false", "data.batch_size=4"]
    first = subprocess.Popen(cmd + ["train.steps=100000"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "latest").exists():          # it holds the lock and has written a checkpoint
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.5)
        # a second start of the same job (a requeue overlapping the old allocation) is refused, naming the holder
        second = subprocess.run(cmd + ["train.steps=100000", "--resume", "auto"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by another run: host" in second.stderr and f"pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)                   # pre-emption: it checkpoints and exits 0
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run_dir / ".lock").exists()                 # released
    latest = (run_dir / "latest").read_text()
    # a fresh start without --resume into that directory: refused, the checkpoints untouched
    fresh = subprocess.run(cmd + ["train.steps=3"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 2 and "holds checkpoints of an earlier run" in fresh.stderr, fresh.stderr[-3000:]
    assert "--resume auto" in fresh.stderr and (run_dir / latest / "COMPLETE").exists()
    # `latest` lost: --resume auto continues from the newest complete checkpoint, to a step past it
    step = int(latest[len("step"):])
    os.remove(run_dir / "latest")
    again = subprocess.run(cmd + [f"train.steps={step + 2}", "--resume", "auto"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from the newest complete checkpoint, {latest}" in again.stderr
    assert (run_dir / "latest").read_text() == f"step{step + 2:08d}"
    # a flipped byte in the newest checkpoint's module file: the resume refuses, naming the file and the way on
    newest = run_dir / (run_dir / "latest").read_text()
    module = newest / "mp_rank_00_model_states.pt"
    data = bytearray(module.read_bytes())
    data[len(data) // 2] ^= 0x01
    module.write_bytes(bytes(data))
    flipped = subprocess.run(cmd + [f"train.steps={step + 4}", "--resume", "auto"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert flipped.returncode == 2, flipped.stderr[-3000:]
    assert f"{module}: its bytes changed after the checkpoint was written" in flipped.stderr
    assert "--resume RUN/stepN" in flipped.stderr
