"""A run's directory, the one place that knows its layout (torchtitan's CheckpointManager owns its folder the same
way). Trainer, export, `instruct.init_from`, `model.structure_init` and the recipe checks go through it.

    RUN/
      megatron_p2t.json          the run config and the stage that wrote it (write_info / saved_info)
      train_log.jsonl            one line per logged step; summary.json at the end
      latest                     the tag of the newest complete step, replaced atomically
      .lock                      the running job's host, pid and SLURM job id, its mtime a heartbeat (RunLock)
      stepNNNNNNNN/              one checkpoint: DeepSpeed's files (mp_rank_XX_model_states.pt, its optimizer
        checksums.json           shards ...), extra_rankNNNNN.pt per rank (loader position, RNG, shapes);
        COMPLETE                 checksums.json (sha256 of each, checked where a file is read);
                                 COMPLETE is written last, before the rename from stepNNNNNNNN.tmp/; a step
                                 saved again is renamed to stepNNNNNNNN.replaced/ until the new one is in place

An import (`import-hf`, `import-p2tv2`) is a megatron dist-checkpoint directory instead (metadata.json beside
megatron_p2t.json): `is_import` tells them apart.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from typing import List, Optional

import torch

from data_tools.shards import file_sha256   # the one sha256 of a file, as manifests record shards
from megatron_p2t.checkpoint.hf_dir import CheckpointError

INFO, LOG, SUMMARY, LATEST, COMPLETE = "megatron_p2t.json", "train_log.jsonl", "summary.json", "latest", "COMPLETE"
CHECKSUMS = "checksums.json"            # sha256 of every file of a step, written before COMPLETE
LOCK, REPLACED = ".lock", ".replaced"
STEP = re.compile(r"^step(\d+)$")
IMPORT_MARK = "metadata.json"           # megatron-core's dist_checkpointing writes it


def write_checksums(step: str) -> None:
    """Rank 0, once every rank's files of a step are written: their sha256, beside them."""
    files = sorted(os.path.relpath(os.path.join(d, f), step) for d, _, fs in os.walk(step) for f in fs
                   if f not in (CHECKSUMS, COMPLETE))
    with open(os.path.join(step, CHECKSUMS + ".tmp"), "w") as f:
        json.dump({name: file_sha256(os.path.join(step, name)) for name in files}, f, indent=0)
    os.replace(os.path.join(step, CHECKSUMS + ".tmp"), os.path.join(step, CHECKSUMS))


def verify_checksums(step: str, names: Optional[List[str]] = None) -> None:
    """The step's files (or `names` of them) against the sha256 written when it was saved; a step saved before
    checksums existed is read as it is. A mismatch names the file and the way on."""
    path = os.path.join(step, CHECKSUMS)
    if not os.path.exists(path):
        return
    with open(path) as f:
        want = json.load(f)
    for name in names if names is not None else sorted(want):
        full = os.path.join(step, name)
        if name not in want:
            continue
        if not os.path.exists(full):
            raise CheckpointError(f"{full}: missing from the checkpoint (checksums.json lists it); resume from "
                                  f"another step of the run (--resume RUN/stepN) or copy the step again")
        if file_sha256(full) != want[name]:
            raise CheckpointError(f"{full}: its bytes changed after the checkpoint was written (sha256 differs "
                                  f"from checksums.json: a disk or copy fault); resume from another step of the run "
                                  f"(--resume RUN/stepN) or copy the step again from where it was written")


def load_file(path: str):
    """torch.load of a checkpoint file, a damaged one (truncated, not a torch file) named with the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, UnicodeDecodeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:120]}); the file is truncated "
                              f"or damaged: resume from another step of the run (--resume RUN/stepN)") from None


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def extra_name(rank: int) -> str:
    return f"extra_rank{rank:05d}.pt"


class RunDir:
    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    # -- the run's files --
    @property
    def log(self) -> str:
        return self.join(LOG)

    @property
    def summary(self) -> str:
        return self.join(SUMMARY)

    def write_info(self, cfg, stage: str) -> None:
        """What a checkpoint was made from, beside it, for the commands that read it later (config.check_same_recipe,
        export): the run config and the stage that wrote it (align, align-feature, instruct, import, ...). Rank 0
        writes it."""
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            with open(self.join(INFO), "w") as f:
                json.dump({"config": dataclasses.asdict(cfg), "stage": stage}, f, indent=1, default=str)

    # -- writing a checkpoint (trainer, rank 0 where it says so) --
    def staging(self, tag: str) -> str:
        """Where a checkpoint is written before it is complete."""
        return self.join(tag + ".tmp")

    def clear_staging(self, tag: str) -> None:
        """Rank 0: a staging directory left by a run that stopped while saving."""
        if os.path.exists(self.staging(tag)):
            shutil.rmtree(self.staging(tag))

    def complete(self, tag: str, keep_last: int) -> None:
        """Rank 0, once every rank has written its files: the marker, the rename to its final name, `latest`, and
        the oldest checkpoints beyond keep_last removed (never the one `latest` names). A step saved again (a
        signal during a periodic save saves that step once more) replaces the complete one atomically: the old
        one is renamed aside first and removed only after the new one is in place, so a kill at any point leaves
        a complete checkpoint of that step (newest_complete renames it back)."""
        write_checksums(self.staging(tag))
        open(os.path.join(self.staging(tag), COMPLETE), "w").close()
        final = self.join(tag)
        aside = final + REPLACED
        if os.path.exists(final):
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(self.staging(tag), final)
        with open(self.join(LATEST + ".tmp"), "w") as f:
            f.write(tag)
        os.replace(self.join(LATEST + ".tmp"), self.join(LATEST))
        if os.path.exists(aside):
            shutil.rmtree(aside)
        done = [t for t in self.steps() if t != tag]
        for old in done[: max(0, len(done) - (keep_last - 1))]:
            shutil.rmtree(self.join(old))

    def clean_staging(self) -> List[str]:
        """Rank 0 at a run's start: staging directories of saves that were cut short (never complete), removed."""
        gone = [x for x in os.listdir(self.path) if x.startswith("step") and x.endswith(".tmp")]
        for x in gone:
            shutil.rmtree(self.join(x))
        return gone

    # -- reading --
    def steps(self) -> List[str]:
        """Tags of the step directories (complete or not), oldest first."""
        if not os.path.isdir(self.path):
            return []
        return sorted(x for x in os.listdir(self.path) if STEP.match(x))

    def newest_complete(self) -> Optional[str]:
        """The newest complete step's tag; a step whose replacement was cut short is renamed back first."""
        if not os.path.isdir(self.path):
            return None
        for x in os.listdir(self.path):
            if x.endswith(REPLACED) and self.is_complete(self.join(x)):
                tag = x[:-len(REPLACED)]
                if not self.is_complete(self.join(tag)):
                    if os.path.exists(self.join(tag)):
                        shutil.rmtree(self.join(tag))
                    os.replace(self.join(x), self.join(tag))
        done = [t for t in self.steps() if self.is_complete(self.join(t))]
        return max(done, key=lambda t: int(STEP.match(t).group(1))) if done else None

    def resume_tag(self) -> Optional[str]:
        """What `--resume auto` continues from: the step `latest` names when it is complete, else (latest lost or
        dangling: a kill while it was replaced) the newest complete step, said on stderr; None when there is
        none (a fresh run)."""
        tag = self.latest()
        if tag is not None and self.is_complete(self.join(tag)):
            return tag
        newest = self.newest_complete()
        if newest is not None:
            why = "no `latest`" if tag is None else f"`latest` names {tag}, which is not a complete checkpoint"
            print(f"{self.path}: {why}; resuming from the newest complete checkpoint, {newest}", file=sys.stderr,
                  flush=True)
        return newest

    def check_fresh(self) -> None:
        """A run started without --resume must not write into a directory holding another run's checkpoints: its
        steps would mix with theirs and pruning would remove what it just wrote."""
        done = [t for t in self.steps() if self.is_complete(self.join(t))]
        if done or self.latest() is not None:
            raise CheckpointError(f"train.save_dir={self.path} holds checkpoints of an earlier run ({', '.join(done)}"
                                  f"{'; latest ' + self.latest() if self.latest() else ''}): continue it with "
                                  f"--resume auto, or start a new run in another train.save_dir (or remove that "
                                  f"directory's checkpoints first)")

    def latest(self) -> Optional[str]:
        """The tag `latest` names, or None when there is none."""
        if not os.path.exists(self.join(LATEST)):
            return None
        with open(self.join(LATEST)) as f:
            return f.read().strip()

    @staticmethod
    def is_complete(step: str) -> bool:
        return os.path.exists(os.path.join(step, COMPLETE))

    @staticmethod
    def is_import(path: str) -> bool:
        """An `import-hf` / `import-p2tv2` checkpoint (a dist-checkpoint directory), not a training run."""
        return bool(path) and os.path.exists(os.path.join(path, IMPORT_MARK))

    @classmethod
    def step(cls, path: str, what: str) -> str:
        """A run's directory (its `latest`) or one of its step directories -> that complete step directory. `what`
        names the run expected and the option that gave it, for the error."""
        fix = f"pass {what}: a run's train.save_dir or one of its stepN directories"
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such directory; {fix}")
        tag = cls(path).latest()
        if tag is not None:
            path = os.path.join(path, tag)
        if not cls.is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker: a step cut short while it "
                                  f"was written, or not a run's directory); {fix}")
        return path

    @staticmethod
    def saved_info(path: str) -> Optional[dict]:
        """The megatron_p2t.json a run, an import or an export directory keeps beside a checkpoint (in the directory
        or, for a run's stepN directory, its parent); None when there is none."""
        for d in (path, os.path.dirname(os.path.normpath(path))):
            f = os.path.join(d, INFO)
            if os.path.exists(f):
                with open(f) as fh:
                    return json.load(fh)
        return None

    @staticmethod
    def model_files(step: str) -> List[str]:
        """DeepSpeed's module files of a step, one per model-parallel rank, in rank order."""
        return sorted(glob.glob(os.path.join(step, "mp_rank_*_model_states.pt")))

    @staticmethod
    def model_file(step: str, mp_rank: int) -> str:
        return os.path.join(step, f"mp_rank_{mp_rank:02d}_model_states.pt")

    @classmethod
    def module_states(cls, step: str) -> List[dict]:
        """The module state dicts of a step, one per model-parallel rank (the trained tensors only), each file
        checked against the step's checksums first."""
        files = cls.model_files(step)
        if not files:
            raise CheckpointError(f"{step}: no mp_rank_*_model_states.pt files (a DeepSpeed checkpoint of a "
                                  f"training run?)")
        verify_checksums(step, [os.path.basename(f) for f in files])
        return [load_file(f)["module"] for f in files]

    @staticmethod
    def extra_files(step: str) -> List[str]:
        return sorted(f for f in os.listdir(step) if f.startswith("extra_rank"))

    @staticmethod
    def extra_file(step: str, rank: int) -> str:
        return os.path.join(step, extra_name(rank))


def _alive(pid) -> bool:
    """Whether a process of this host runs: a killed one whose parent has not reaped it yet (a zombie, as the
    ranks of a killed launcher can stay) does not."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class RunLock:
    """A run directory held by one job at a time: `.lock` holds the holder's host, pid and SLURM job, and its
    mtime is a heartbeat (a thread touches it every `beat_s`). A second start is refused naming the holder; a lock
    whose pid is gone on this host, or whose heartbeat stopped `stale_s` ago (a job killed elsewhere), is taken
    over, and said so."""

    def __init__(self, run: RunDir, stale_s: float, beat_s: float = 30.0):
        self.path, self.stale_s, self.beat_s = run.join(LOCK), stale_s, min(beat_s, stale_s / 4)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _mine(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                "restart": os.environ.get("SLURM_RESTART_COUNT"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "token": self.token}

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def stale_because(self, holder: Optional[dict]) -> Optional[str]:
        """Why the lock may be taken over, or None while its holder lives."""
        if holder is None:
            return "unreadable"
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            return f"process {holder['pid']} on this host is gone"
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "released"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        mine = json.dumps(self._mine())
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            why = self.stale_because(holder)
            if why is None:
                h = holder or {}
                age = time.time() - os.path.getmtime(self.path)
                raise CheckpointError(
                    f"{os.path.dirname(self.path)} is in use by another run: host {h.get('host')}, pid {h.get('pid')}"
                    f"{', SLURM job ' + str(h['job']) if h.get('job') else ''}, started {h.get('started')}, last "
                    f"heartbeat {age:.0f} s ago. Two jobs writing one train.save_dir mix their checkpoints: wait "
                    f"for it to end, or use another train.save_dir. If that job is gone, its lock is taken over "
                    f"after {self.stale_s / 60:g} min without heartbeat (train.lock_stale_minutes), or remove "
                    f"{self.path}") from None
            tmp = f"{self.path}.{self.token}"
            with open(tmp, "w") as f:
                f.write(mine)
            os.replace(tmp, self.path)
            time.sleep(0.2)                 # another starter that saw the same stale lock: the last writer wins
            if (self._holder() or {}).get("token") != self.token:
                raise CheckpointError(f"{self.path}: another run took over the stale lock at the same moment; "
                                      f"use another train.save_dir or start one of them later") from None
            print(f"{self.path}: took over the lock of {holder} ({why})", file=sys.stderr, flush=True)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(mine)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if (self._holder() or {}).get("token") == self.token:
            os.remove(self.path)
