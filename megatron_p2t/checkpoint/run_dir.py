"""A run's directory, the one place that knows its layout (torchtitan's CheckpointManager owns its folder the same
way). Trainer, export, `instruct.init_from`, `model.structure_init` and the recipe checks go through it.

    RUN/
      megatron_p2t.json          the run config and the stage that wrote it (write_info / saved_info)
      train_log.jsonl            one line per logged step; summary.json at the end
      latest                     the tag of the newest complete step, replaced atomically
      stepNNNNNNNN/              one checkpoint: DeepSpeed's files (mp_rank_XX_model_states.pt, its optimizer
        COMPLETE                 shards ...), extra_rankNNNNN.pt per rank (loader position, RNG, shapes);
                                 COMPLETE is written last, before the rename from stepNNNNNNNN.tmp/

An import (`import-hf`, `import-p2tv2`) is a megatron dist-checkpoint directory instead (metadata.json beside
megatron_p2t.json): `is_import` tells them apart.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import List, Optional

import torch

from megatron_p2t.checkpoint.hf_dir import CheckpointError

INFO, LOG, SUMMARY, LATEST, COMPLETE = "megatron_p2t.json", "train_log.jsonl", "summary.json", "latest", "COMPLETE"
IMPORT_MARK = "metadata.json"           # megatron-core's dist_checkpointing writes it


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
        the oldest checkpoints beyond keep_last removed."""
        open(os.path.join(self.staging(tag), COMPLETE), "w").close()
        final = self.join(tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(self.staging(tag), final)
        with open(self.join(LATEST + ".tmp"), "w") as f:
            f.write(tag)
        os.replace(self.join(LATEST + ".tmp"), self.join(LATEST))
        done = self.steps()
        for old in done[: -keep_last]:
            shutil.rmtree(self.join(old))

    # -- reading --
    def steps(self) -> List[str]:
        """Tags of the step directories (complete or not), oldest first."""
        return sorted(x for x in os.listdir(self.path) if x.startswith("step") and not x.endswith(".tmp"))

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
        """The module state dicts of a step, one per model-parallel rank (the trained tensors only)."""
        files = cls.model_files(step)
        if not files:
            raise CheckpointError(f"{step}: no mp_rank_*_model_states.pt files (a DeepSpeed checkpoint of a "
                                  f"training run?)")
        return [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]

    @staticmethod
    def extra_files(step: str) -> List[str]:
        return sorted(f for f in os.listdir(step) if f.startswith("extra_rank"))

    @staticmethod
    def extra_file(step: str, rank: int) -> str:
        return os.path.join(step, extra_name(rank))
