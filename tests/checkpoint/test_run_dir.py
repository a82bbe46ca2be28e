"""The run directory cannot be clobbered: one job holds it, a fresh start does not write over an earlier run, a
step saved again replaces the old one atomically, `--resume auto` finds the newest complete checkpoint when
`latest` is lost, pruning keeps what `latest` names, and a torn log line does not stop a resume. Each case first
reproduces the failure the code before had, then the behaviour now."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.checkpoint.run_dir import RunDir, RunLock


def _step(run: RunDir, n: int, complete: bool = True, payload: str = "") -> str:
    tag = f"step{n:08d}"
    os.makedirs(run.staging(tag))
    with open(os.path.join(run.staging(tag), "mp_rank_00_model_states.pt"), "w") as f:
        f.write(payload or tag)
    if complete:
        run.complete(tag, keep_last=3)
    return tag


def test_a_step_saved_again_replaces_the_old_one_atomically(tmp_path, monkeypatch):
    """The trainer saves a step again after a signal during its periodic save. The code before deleted the
    complete stepN before renaming stepN.tmp onto it: a kill there left `latest` naming nothing."""
    run = RunDir(str(tmp_path))
    _step(run, 10, payload="first")
    os.makedirs(run.staging("step00000010"))
    open(os.path.join(run.staging("step00000010"), "mp_rank_00_model_states.pt"), "w").write("second")
    real = os.replace
    calls = []

    def killed_after_moving_the_old_step_aside(a, b):
        calls.append((a, b))
        real(a, b)
        if a == run.join("step00000010"):
            raise KeyboardInterrupt("SIGKILL")
    monkeypatch.setattr(os, "replace", killed_after_moving_the_old_step_aside)
    with pytest.raises(KeyboardInterrupt):
        run.complete("step00000010", keep_last=3)
    monkeypatch.setattr(os, "replace", real)
    assert not os.path.exists(run.join("step00000010"))            # the window the old code left empty
    assert run.latest() == "step00000010"                           # `latest` dangles ...
    assert run.resume_tag() == "step00000010"                       # ... and the old complete copy comes back
    assert open(run.join("step00000010", "mp_rank_00_model_states.pt")).read() == "first"
    # uninterrupted, the new one replaces it and nothing is left aside
    os.makedirs(run.staging("step00000010"), exist_ok=True)
    open(os.path.join(run.staging("step00000010"), "mp_rank_00_model_states.pt"), "w").write("second")
    run.complete("step00000010", keep_last=3)
    assert open(run.join("step00000010", "mp_rank_00_model_states.pt")).read() == "second"
    assert sorted(os.listdir(tmp_path)) == ["latest", "step00000010"]


def test_resume_auto_takes_the_newest_complete_checkpoint_when_latest_is_lost_or_dangling(tmp_path, capsys):
    run = RunDir(str(tmp_path))
    for n in (10, 20):
        _step(run, n)
    _step(run, 30, complete=False)                                  # a save cut short
    os.remove(run.join("latest"))
    assert run.resume_tag() == "step00000020"
    assert "no `latest`; resuming from the newest complete checkpoint, step00000020" in capsys.readouterr().err
    open(run.join("latest"), "w").write("step00000040")              # names a step that is not there
    assert run.resume_tag() == "step00000020"
    assert "`latest` names step00000040, which is not a complete checkpoint" in capsys.readouterr().err
    assert RunDir(str(tmp_path / "empty")).resume_tag() is None        # nothing to resume: a fresh run


def test_pruning_never_removes_what_latest_names(tmp_path):
    """The code before pruned by step number: a run writing step 20 into a directory holding step 100 deleted its
    own step 20 at once and left `latest` naming nothing."""
    run = RunDir(str(tmp_path))
    _step(run, 100)
    _step(run, 20)
    assert run.latest() == "step00000020" and os.path.exists(run.join("step00000020"))
    for n in (30, 40, 50):
        _step(run, n)
    assert run.steps() == ["step00000040", "step00000050", "step00000100"] and run.latest() == "step00000050"


def test_a_fresh_start_into_a_directory_with_checkpoints_is_refused_with_the_ways_forward(tmp_path):
    run = RunDir(str(tmp_path))
    run.check_fresh()                                                # empty: fine
    _step(run, 10)
    with pytest.raises(CheckpointError, match=r"holds checkpoints of an earlier run \(step00000010; latest "
                                              r"step00000010\): continue it with --resume auto, or start a new run "
                                              r"in another train.save_dir"):
        run.check_fresh()


def test_one_job_holds_the_directory_and_a_dead_or_silent_holder_is_taken_over(tmp_path, capsys):
    run = RunDir(str(tmp_path))
    first = RunLock(run, stale_s=60)
    first.acquire()
    with pytest.raises(CheckpointError, match=rf"in use by another run: host {socket.gethostname()}, pid "
                                              rf"{os.getpid()}.*last heartbeat \d+ s ago"):
        RunLock(run, stale_s=60).acquire()
    first.release()
    assert not os.path.exists(run.join(".lock"))
    # a holder killed on this host: its pid is gone, or a zombie its parent has not reaped (a killed launcher's ranks)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    while open(f"/proc/{dead.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    for reaped in (False, True):
        if reaped:
            dead.wait()
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "job": "7"}, open(run.join(".lock"), "w"))
        lock = RunLock(run, stale_s=60)
        lock.acquire()
        assert f"process {dead.pid} on this host is gone" in capsys.readouterr().err
        lock.release()
    # a holder on another host: alive while its heartbeat is fresh, taken over once it has stopped
    json.dump({"host": "node-17", "pid": 1, "job": "8"}, open(run.join(".lock"), "w"))
    with pytest.raises(CheckpointError, match=r"host node-17, pid 1, SLURM job 8"):
        RunLock(run, stale_s=60).acquire()
    old = time.time() - 120
    os.utime(run.join(".lock"), (old, old))
    lock = RunLock(run, stale_s=60)
    lock.acquire()
    assert "no heartbeat for 12" in capsys.readouterr().err
    before = os.path.getmtime(run.join(".lock"))
    lock2 = RunLock(run, stale_s=0.4)          # its heartbeat: a tenth of a second
    lock.release()
    lock2.acquire()
    time.sleep(0.5)
    assert os.path.getmtime(run.join(".lock")) > before
    lock2.release()


def test_a_torn_last_log_line_is_dropped_and_a_damaged_earlier_one_named(tmp_path, capsys):
    """A full disk or a kill while the log was written leaves a torn last line; the code before failed every
    later resume with a JSONDecodeError."""
    from megatron_p2t.training.trainer import trim_log
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    trim_log(str(log), 2)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'
    assert "line 3 is torn" in capsys.readouterr().err
    log.write_text('{"step": 1, "loss": 2.0}\nxx\n{"step": 3, "loss": 1.8}\n')
    with pytest.raises(CheckpointError, match=r"train_log.jsonl: line 2 is not a log record"):
        trim_log(str(log), 3)


def test_every_file_of_a_step_is_checked_against_the_checksums_written_with_it(tmp_path):
    """A flipped byte in a model or optimizer file trained on silently before (DeepSpeed loads what it finds); a
    truncated one failed with OSError 22 or UnicodeDecodeError naming no file."""
    import torch

    from megatron_p2t.checkpoint.run_dir import load_file, verify_checksums
    run = RunDir(str(tmp_path))
    os.makedirs(run.staging("step00000010"))
    path = os.path.join(run.staging("step00000010"), "mp_rank_00_model_states.pt")
    torch.save({"module": {"connector.fc1.weight": torch.arange(1000.0)}}, path)
    run.complete("step00000010", keep_last=3)
    step = run.join("step00000010")
    assert set(json.load(open(os.path.join(step, "checksums.json")))) == {"mp_rank_00_model_states.pt"}
    verify_checksums(step)
    assert torch.equal(RunDir.module_states(step)[0]["connector.fc1.weight"], torch.arange(1000.0))
    data = bytearray(open(os.path.join(step, "mp_rank_00_model_states.pt"), "rb").read())
    data[len(data) // 2] ^= 0x01
    open(os.path.join(step, "mp_rank_00_model_states.pt"), "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: its bytes changed after the checkpoint "
                                              r"was written .*--resume RUN/stepN"):
        RunDir.module_states(step)
    open(os.path.join(step, "mp_rank_00_model_states.pt"), "wb").write(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: cannot be read .*truncated or damaged"):
        load_file(os.path.join(step, "mp_rank_00_model_states.pt"))
    os.remove(os.path.join(step, "checksums.json"))       # a step written before checksums: read as it is
    verify_checksums(step)


def test_export_verify_refuses_all_zero_logits():
    from megatron_p2t.export import degenerate
    degenerate(3.5, "/out")
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match=r"/out: the exported model's logits .* are all"):
            degenerate(bad, "/out")
