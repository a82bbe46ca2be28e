"""One driver for every training stage (litgpt's setup -> main -> fit): a stage declares its checks, the config it
runs, its model, loader, step and evaluation (training/stages/); `run` does the rest in one order for all of them:
refusals before any process group, the recipe check of a checkpoint to resume, the process groups, gradient
accumulation, the model, the data, the run directory's record, and the shared Trainer."""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

import torch.distributed as dist

from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.checkpoint.run_dir import RunDir, RunLock
from megatron_p2t.config import check_same_recipe
from megatron_p2t.parallel import state
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.training.trainer import Trainer, resume_dir, with_grad_accum


class Stage:
    """A training stage. Subclasses set `name` (what megatron_p2t.json records) and override what differs."""
    name: str = ""

    def prepare(self, cfg):
        """Refusals and the config the stage runs, before any process group exists (no side effects)."""
        return cfg

    def micro_batch(self, cfg) -> Optional[int]:
        """Per-rank samples of one micro-batch, from which train.global_batch resolves train.grad_accum."""
        return cfg.data.batch_size

    def build(self, cfg, layout: Layout):
        raise NotImplementedError

    def loader(self, cfg, layout: Layout):
        raise NotImplementedError

    def step(self, cfg, layout: Layout) -> Callable:
        """step_fn(engine, batch) -> (loss, metrics); with whole_step, step_fn(engine, batches)."""
        raise NotImplementedError

    def evaluate(self, cfg, layout: Layout) -> Optional[Callable]:
        """eval_fn(engine) -> metrics, or None."""
        return None

    def record(self, cfg) -> str:
        return self.name

    def trainer_micro_batch(self, cfg) -> int:
        """What DeepSpeed counts as one micro-batch (packed rows: 1)."""
        return cfg.data.batch_size

    def param_groups(self, model, cfg) -> Optional[List[dict]]:
        return None

    def whole_step(self, layout: Layout) -> bool:
        return False


def run(stage: Stage, cfg, resume: Optional[str] = None) -> dict:
    """Train `stage` on `cfg`, resuming from `resume` (None, "auto", or a checkpoint)."""
    cfg = stage.prepare(cfg)
    run_dir = RunDir(cfg.train.save_dir)
    if resume:
        check_same_recipe(resume_dir(cfg, resume), cfg, "--resume")
    else:
        run_dir.check_fresh()
    layout = state.initialize(cfg.parallel)
    lock = hold(run_dir, cfg.train.lock_stale_minutes * 60)
    try:
        cfg = with_grad_accum(cfg, stage.micro_batch(cfg), layout.dp)
        model = stage.build(cfg, layout)
        loader = stage.loader(cfg, layout)
        step_fn, eval_fn = stage.step(cfg, layout), stage.evaluate(cfg, layout)
        run_dir.write_info(cfg, stage.record(cfg))
        trainer = Trainer(model, cfg, loader, step_fn, layout, eval_fn, micro_batch=stage.trainer_micro_batch(cfg),
                          param_groups=stage.param_groups(model, cfg), whole_step=stage.whole_step(layout))
        return trainer.run(resume)
    finally:
        if lock is not None:
            lock.release()


def hold(run_dir: RunDir, stale_s: float) -> Optional[RunLock]:
    """Collective: rank 0 takes the run directory's lock (and clears staging directories of saves cut short), and
    every rank learns whether it could, so all of them refuse together."""
    lock, refusal = None, None
    if dist.get_rank() == 0:
        os.makedirs(run_dir.path, exist_ok=True)
        try:
            lock = RunLock(run_dir, stale_s)
            lock.acquire()
            for gone in run_dir.clean_staging():
                print(f"{run_dir.join(gone)}: a save cut short, removed", file=sys.stderr, flush=True)
        except CheckpointError as e:
            lock, refusal = None, str(e)
    said = [refusal]
    dist.broadcast_object_list(said, src=0)
    if said[0] is not None:
        raise CheckpointError(said[0])
    return lock
