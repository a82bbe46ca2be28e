"""The training loop both stages share: DeepSpeed's engine over megatron-core's process groups.

- DeepSpeed gets megatron-core's groups through `MegatronMPU`, so ZeRO partitions optimizer state over the
  data-parallel group only and gradient clipping sums norms over the model-parallel group.
- AdamW (eps 1e-6, betas 0.9/0.999 by default), linear warmup over `warmup_fraction` of the steps then cosine
  to `min_lr_ratio`, gradient accumulation and clipping, all from the run config (a DeepSpeed JSON may
  override the generated DeepSpeed keys).
- Checkpoints every `save_every` steps and at the end: written as `stepN.tmp/`, completed with a marker,
  renamed to `stepN/`, then `latest` is replaced atomically; the last `keep_last` are kept (checkpoint/run_dir.py
  owns the directory's layout). Each holds the
  DeepSpeed engine (trainable weights, optimizer, scheduler) plus, per rank, the data-loader position, every RNG
  state and the parameter shapes that a resume checks first.
  `--resume auto` continues from the newest complete one, bit-exactly on CPU.
- SIGTERM / SIGUSR1 (pre-emption) -> checkpoint at the next step boundary and exit 0. A non-finite loss skips
  the step on every rank (decided together) and is counted; too many in a row stop the run with an error.
- Two ways to run a step. Micro-batch steps (`whole_step=False`): `step_fn(engine, batch)` returns one
  micro-batch's loss and the trainer runs `engine.backward` / `engine.step` on it, DeepSpeed counting the
  accumulation. Whole steps (`whole_step=True`, pipeline parallelism): `step_fn(engine, batches)` gets all
  `grad_accum` micro-batches and runs their forward and backward itself (megatron-core's 1F1B schedule, which
  owns the backward of every stage); it runs inside DeepSpeed's `coalesce_grad_reduction`, so ZeRO reduces the
  accumulated gradients once over the data-parallel group before `engine.step`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from typing import Callable, Dict, Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.checkpoint.run_dir import RunDir, load_file, tag_of, verify_checksums
from megatron_p2t.config import ConfigError
from megatron_p2t.models.llama_moe import is_expert_param, take_router_stats
from megatron_p2t.models.p2t import current_name
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device
from megatron_p2t.training.experts import ExpertOptimizer, register_groups


class MegatronMPU:
    """The `mpu` interface DeepSpeed expects, answered from the run's Layout (megatron-core's groups)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_model_parallel_group(self):
        return self.layout.mp_group

    def get_model_parallel_rank(self):
        return self.layout.mp_rank

    def get_model_parallel_world_size(self):
        return self.layout.tp * self.layout.pp

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_rank(self):
        return self.layout.dp_rank

    def get_data_parallel_world_size(self):
        return self.layout.dp

    def get_tensor_model_parallel_group(self):
        return self.layout.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.layout.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self):
        return self.layout.tp_src_rank


def lr_lambda(steps: int, warmup_fraction: float, min_ratio: float) -> Callable[[int], float]:
    warm = max(1, int(round(steps * warmup_fraction)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def resolve_grad_accum(tc, micro_batch: Optional[int], dp: int) -> int:
    """train.global_batch -> gradient accumulation steps, or a clear error before any work."""
    if tc.global_batch is None:
        return tc.grad_accum
    if micro_batch is None:
        raise ConfigError("train.global_batch counts samples and needs fixed batches (data.batch_size); with a "
                          "token budget (data.max_tokens) set train.grad_accum instead")
    per_step = micro_batch * dp
    if tc.global_batch <= 0 or tc.global_batch % per_step:
        lower = max(per_step, tc.global_batch // per_step * per_step)
        raise ConfigError(f"train.global_batch={tc.global_batch} is not a multiple of data.batch_size x "
                          f"data-parallel size = {micro_batch} x {dp} = {per_step}; use e.g. {lower} or "
                          f"{lower + per_step}, or change data.batch_size / the number of processes")
    accum = tc.global_batch // per_step
    if tc.grad_accum not in (1, accum):
        raise ConfigError(f"train.grad_accum={tc.grad_accum} contradicts train.global_batch={tc.global_batch} "
                          f"(which gives {accum} at data.batch_size={micro_batch}, data-parallel size {dp}): set "
                          f"one")
    return accum


def trim_log(log: str, step: int) -> None:
    """The train log as far as `step`, for a run that resumes there. A torn last line (a full disk or a kill while
    it was written) is dropped and said; a damaged line before it is an error naming the file and line."""
    if not os.path.exists(log):
        return
    lines = open(log, encoding="utf-8", errors="replace").read().splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                print(f"{log}: line {i + 1} is torn ({len(line)} bytes, written when the run stopped); dropped",
                      file=sys.stderr, flush=True)
                continue
            raise CheckpointError(f"{log}: line {i + 1} is not a log record ({line[:60]!r}); the file is damaged "
                                  f"before its end: move it aside to resume (the checkpoints hold the state)")
    with open(log + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(log + ".tmp", log)


def resume_dir(cfg, spec: str) -> str:
    """The directory a --resume spec reads: train.save_dir for `auto` or a bare tag, else the path given."""
    return cfg.train.save_dir if spec == "auto" or os.sep not in spec.rstrip(os.sep) else spec


def with_grad_accum(cfg, micro_batch: Optional[int], dp: int):
    """The run config with train.grad_accum resolved from train.global_batch (see resolve_grad_accum)."""
    accum = resolve_grad_accum(cfg.train, micro_batch, dp)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))


def deepspeed_config(tc, micro_batch: int, whole_step: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        # whole steps accumulate inside the pipeline schedule, which already scales each micro-batch by 1/n
        "gradient_accumulation_steps": 1 if whole_step else tc.grad_accum,
        "gradient_clipping": tc.clip_grad,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": torch.cuda.is_available()},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if tc.deepspeed_config:
        if not os.path.exists(tc.deepspeed_config):
            raise FileNotFoundError(f"train.deepspeed_config: {tc.deepspeed_config} does not exist")
        with open(tc.deepspeed_config) as f:
            _merge(cfg, json.load(f))
    return cfg


def check_optimizer(cfg, whole_step: bool, experts: bool) -> None:
    """Refuse the ZeRO setups the trainer cannot step (the stages call this before any process group or model, with
    what their config implies; the Trainer again with what it was given): whole steps (pipeline parallelism) reduce
    gradients through ZeRO 1/2 (DeepSpeedEngine.coalesce_grad_reduction), and expert parallelism steps the experts
    beside a ZeRO 1/2 optimizer whose gradient norm it joins. DeepSpeed gives bf16 at stage 1 with fp32 gradient
    accumulation (data_types.grad_accum_dtype, no optimizer offload) to its BF16_Optimizer instead
    (DeepSpeedEngine._configure_zero_optimizer's choice), which has no such norm."""
    par = cfg.parallel
    ds = deepspeed_config(cfg.train, 1)  # the YAML's keys with the JSON's merged over them, as the engine gets them
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    for needed, what in ((whole_step, f"pipeline-parallel training (parallel.pipeline={par.pipeline}) reduces "
                                      f"gradients through ZeRO"),
                         (experts, f"expert parallelism (parallel.expert={par.expert}) trains the experts beside "
                                   f"ZeRO")):
        if needed and stage not in (1, 2):
            raise ConfigError(f"{what}: set train.zero_stage to 1 or 2 (it is {stage})")
    if experts and stage == 1:
        from deepspeed.runtime.config import DtypeEnum
        bf16 = (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False)
        accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"
        if bf16 and accum is not None and DtypeEnum(accum).value == torch.float32 and not offload:
            raise ConfigError(f"expert parallelism (parallel.expert={par.expert}) clips the experts and the other "
                              f"parameters by one norm, joined to ZeRO's; bf16 at ZeRO stage 1 with fp32 gradient "
                              f"accumulation (data_types.grad_accum_dtype in {cfg.train.deepspeed_config}) makes "
                              f"DeepSpeed take its BF16_Optimizer, which has none: set train.zero_stage=2 or drop "
                              f"grad_accum_dtype")


def _merge(into: dict, extra: dict) -> None:
    """Nested update: a JSON giving zero_optimization.overlap_comm keeps the stage chosen in the YAML."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
    get_cuda_rng_tracker().set_states(s["tracker"])


def _samples(batch) -> int:
    return int(batch["valid"].sum()) if "valid" in batch else len(batch["keys"])


class Stop(Exception):
    pass


class Trainer:
    def __init__(self, model, cfg, loader, step_fn: Callable, layout: Layout, eval_fn: Optional[Callable] = None,
                 micro_batch: int = 1, param_groups: Optional[list] = None, whole_step: bool = False):
        self.layout = layout
        self.cfg, self.tc, self.loader, self.step_fn, self.eval_fn = cfg, cfg.train, loader, step_fn, eval_fn
        self.whole_step = whole_step
        self.rank = dist.get_rank()
        self.experts = None
        schedule = lr_lambda(self.tc.steps, self.tc.warmup_fraction, self.tc.min_lr_ratio)
        experts = [(n, p) for n, p in model.named_parameters() if p.requires_grad and is_expert_param(p)]
        check_optimizer(cfg, whole_step, bool(experts))
        if experts:    # expert parallelism: experts stepped beside the engine (training/experts.py)
            ids = {id(p) for _, p in experts}
            register_groups(layout, [p for _, p in experts])
            self.experts = ExpertOptimizer(experts, self.tc, layout, schedule)
            if param_groups:
                param_groups = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in param_groups]
            else:
                param_groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}]
        params = param_groups or [p for p in model.parameters() if p.requires_grad]
        if not params or (param_groups and not any(g["params"] for g in param_groups)):
            raise ConfigError("nothing to train: every parameter is frozen (see model.freeze)")
        opt = torch.optim.AdamW(params, lr=self.tc.lr, betas=tuple(self.tc.adam_betas), eps=self.tc.adam_eps,
                                weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                    config=deepspeed_config(self.tc, micro_batch, whole_step),
                                                    mpu=MegatronMPU(layout))
        if self.experts:
            self.experts.take_weights()
            if not hasattr(self.engine.optimizer, "scaled_global_norm"):
                raise ConfigError(f"expert parallelism clips the experts and the other parameters by one norm, "
                                  f"joined to the one DeepSpeed's ZeRO optimizer computes; DeepSpeed chose "
                                  f"{type(self.engine.optimizer).__name__} here: set train.zero_stage=2")
            self.experts.join_norm(self.engine.optimizer)
        if whole_step and not hasattr(self.engine, "coalesce_grad_reduction"):
            raise RuntimeError(f"pipeline-parallel training needs DeepSpeedEngine.coalesce_grad_reduction, which "
                               f"DeepSpeed {deepspeed.__version__} lacks; install 0.19.1 or newer (pyproject.toml's "
                               f"floor)")
        self._trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.step, self.nonfinite, self.nonfinite_total = 0, 0, 0
        self._signal = 0
        self.writer = None
        if self.rank == 0 and self.tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(self.tc.save_dir, "tensorboard"))
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        self._signal = signum

    # -- checkpoints --
    def save(self) -> str:
        tag = tag_of(self.step)
        run = RunDir(self.tc.save_dir)
        if self.rank == 0:
            run.clear_staging(tag)
        dist.barrier()
        # frozen towers are not saved: they never change (ESM-3B alone is 6 GB per checkpoint) and come back from
        # the HF directories named in the config, which _check_compatible confirms by shape
        staging = run.staging(tag)
        with self._module_file_without_experts():
            self.engine.save_checkpoint(run.path, tag=os.path.basename(staging), save_latest=False,
                                        exclude_frozen_parameters=True,
                                        client_state={"step": self.step, "nonfinite_total": self.nonfinite_total})
        torch.save({"loader": self.loader.state_dict(), "rng": rng_state(), "nonfinite": self.nonfinite,
                    "shapes": self._shapes(), "experts": self.experts.state_dict() if self.experts else None},
                   RunDir.extra_file(staging, self.rank))
        if self.experts:
            self.experts.save_weights(staging)
        dist.barrier()
        if self.rank == 0:
            run.complete(tag, self.tc.keep_last)
        dist.barrier()
        return tag

    @contextlib.contextmanager
    def _module_file_without_experts(self):
        """Under expert parallelism the experts are written beside DeepSpeed's files, every expert-parallel rank's in
        fp32 (training/experts.py); DeepSpeed's module file, written by the first data-parallel rank, would hold that
        rank's experts a second time. Its engine reads the module's tensors through `module_state_dict` when
        saving, so this engine's is narrowed for the save (resume loads non-strictly, then the experts' files)."""
        if not self.experts:
            yield
            return
        full = self.engine.module_state_dict
        drop = {n for n, p in self.engine.module.named_parameters() if is_expert_param(p)}
        self.engine.module_state_dict = lambda *a, **kw: {k: v for k, v in full(*a, **kw).items() if k not in drop}
        try:
            yield
        finally:
            del self.engine.module_state_dict      # the class's method again

    def _shapes(self) -> Dict[str, list]:
        return {n: list(p.shape) for n, p in self.engine.module.named_parameters()}

    def _check_compatible(self, ckpt: str) -> dict:
        """This rank's extra state, after checking the checkpoint was written by the same layout and model shape:
        otherwise DeepSpeed fails deep inside load_state_dict, or a different data-parallel size silently
        mis-assigns ZeRO shards and loader positions."""
        world = dist.get_world_size()
        ranks = RunDir.extra_files(ckpt)
        if len(ranks) != world:
            raise CheckpointError(f"{ckpt} was written by {len(ranks)} processes, this run has {world}: ZeRO "
                                  f"optimizer shards and data positions are per rank, so resume with the same number "
                                  f"of processes and parallel.tensor/pipeline (or start a fresh run from its weights)")
        extra = load_file(RunDir.extra_file(ckpt, self.rank))
        saved, now = extra.get("shapes"), self._shapes()
        if saved is not None:                # written before the connector's rename: `projector.*`
            saved = {current_name(k): v for k, v in saved.items()}
        if saved is not None and saved != now:
            for name in list(dict.fromkeys([*saved, *now])):
                if saved.get(name) != now.get(name):
                    raise CheckpointError(f"{ckpt} holds a different model: parameter {name} is {saved.get(name)} "
                                          f"there and {now.get(name)} in this run (rank {self.rank}); the model "
                                          f"config (model.*, LoRA r, connector dims) or parallel.tensor differs from "
                                          f"the run that wrote it")
        return extra

    def _verify(self, ckpt: str) -> None:
        """Collective: rank 0 checks every file of the checkpoint against its checksums, every rank learns the
        answer (DeepSpeed would load a flipped byte silently)."""
        said = [None]
        if self.rank == 0:
            try:
                verify_checksums(ckpt)
            except CheckpointError as e:
                said = [str(e)]
        dist.broadcast_object_list(said, src=0)
        if said[0] is not None:
            raise CheckpointError(said[0])

    def resume(self, spec: Optional[str]) -> bool:
        """spec: None (fresh), "auto" (newest complete checkpoint if any), or a tag/directory."""
        if not spec:
            return False
        d = self.tc.save_dir
        if spec == "auto":
            tag = RunDir(d).resume_tag()
            if tag is None:
                return False
        else:
            tag = os.path.basename(spec.rstrip("/"))
            d = os.path.dirname(spec.rstrip("/")) or d
        if not RunDir.is_complete(os.path.join(d, tag)):
            raise FileNotFoundError(f"{os.path.join(d, tag)}: no complete checkpoint there (interrupted while "
                                    f"saving?); pass another tag or --resume auto")
        self._verify(os.path.join(d, tag))
        extra = self._check_compatible(os.path.join(d, tag))
        _, client = self.engine.load_checkpoint(d, tag=tag, load_module_strict=False)  # frozen ones: see save()
        if self.experts:      # after the engine, whose module file holds the first data-parallel rank's experts
            self.experts.load_weights(os.path.join(d, tag))
            self.experts.load_state_dict(extra["experts"])
        self.loader.load_state_dict(extra["loader"])
        set_rng_state(extra["rng"])
        self.step, self.nonfinite = client["step"], extra["nonfinite"]
        self.nonfinite_total = client["nonfinite_total"]
        if self.rank == 0:  # the log continues from the checkpoint: drop what came after it
            trim_log(RunDir(self.tc.save_dir).log, self.step)
        return True

    def run(self, resume: Optional[str] = None) -> Dict:
        """Resume (None / "auto" / a checkpoint), train to the end, and write summary.json beside the run."""
        resumed = self.resume(resume)
        result = self.train()
        result["resumed"] = resumed
        if self.rank == 0:
            with open(RunDir(self.tc.save_dir).summary, "w") as f:
                json.dump(result, f, indent=1)
        return result

    # -- the loop --
    def _agree(self, flag: float, op=dist.ReduceOp.MAX) -> float:
        t = torch.tensor([float(flag)], device=collective_device())
        dist.all_reduce(t, op=op)
        return float(t)

    def train(self, on_step: Optional[Callable] = None) -> Dict:
        from tqdm import tqdm
        tc = self.tc
        bar = tqdm(total=tc.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True, file=sys.stderr)
        it = iter(self.loader)
        t0, samples, history = time.perf_counter(), 0, []
        micro_losses = []
        while self.step < tc.steps:
            if self._agree(self._signal):
                tag = self.save()
                bar.close()
                raise Stop(f"signal received: checkpoint {tag} written at step {self.step}")
            if self.whole_step:
                done = self._run_whole_step(it)
                if done is None:
                    self._count_nonfinite()
                    continue
                lv, metrics, n = done
                samples += n
            else:
                batch = next(it)
                loss, metrics = self.step_fn(self.engine, batch)
                if self._agree(0.0 if bool(torch.isfinite(loss).all()) else 1.0):
                    # Skipped as a micro-step (no backward, no engine.step), so DeepSpeed's accumulation boundary
                    # simply waits for one more finite micro-batch.
                    self._count_nonfinite()
                    continue
                self.nonfinite = 0
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.backward(loss)
                self._engine_step(boundary)
                micro_losses.append(float(loss.detach()))
                samples += _samples(batch)
                if not boundary:
                    continue
                lv = sum(micro_losses) / len(micro_losses)
                micro_losses = []
            self.step += 1
            history.append(lv)
            # router counts of a mixture-of-experts decoder (collective: every rank, every step)
            metrics = {**metrics, **take_router_stats(self.engine.module, self.layout)}
            if self.experts:
                metrics["expert_grad_norm"] = self.experts.last_norm
            if on_step:
                on_step(self.step, lv)
            if self.rank == 0:
                with open(RunDir(tc.save_dir).log, "a") as f:
                    # the stage's own metrics too (this rank's last micro-batch): the parts of a summed loss
                    gn = self.engine.get_global_grad_norm()     # before clipping; every parameter's
                    f.write(json.dumps({"step": self.step, "loss": lv, "lr": self.engine.get_lr()[0],
                                        **({"grad_norm": float(gn)} if gn is not None else {}),
                                        **{k: float(v) for k, v in metrics.items()}}) + "\n")
                rate = samples / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                if self.writer and (self.step % tc.log_every == 0 or self.step == tc.steps):
                    self.writer.add_scalar("train/loss", lv, self.step)
                    self.writer.add_scalar("train/lr", self.engine.get_lr()[0], self.step)
                    gn = self.engine.get_global_grad_norm()
                    if gn is not None:
                        self.writer.add_scalar("train/grad_norm", float(gn), self.step)
                    for k, v in metrics.items():
                        self.writer.add_scalar(f"train/{k}", float(v), self.step)
                    self.writer.add_scalar("train/nonfinite_skipped", self.nonfinite_total, self.step)
            if self.eval_fn and tc.eval_every and self.step % tc.eval_every == 0:
                self._eval()
            if self.step % tc.save_every == 0 or self.step == tc.steps:
                self.save()
        bar.close()
        result = {"step": self.step, "losses": history, "nonfinite_skipped": self.nonfinite_total}
        if self.eval_fn:
            result["eval"] = self._eval()
        return result

    def _count_nonfinite(self) -> None:
        self.nonfinite += 1
        self.nonfinite_total += 1
        if self.nonfinite > self.tc.max_nonfinite_in_a_row:
            raise RuntimeError(f"{self.nonfinite} non-finite losses in a row at step {self.step}: lower the learning "
                               f"rate, check the data, or resume from an earlier checkpoint")

    def _run_whole_step(self, it):
        """(loss, metrics, samples) of one optimizer step over grad_accum micro-batches, or None when a loss or a
        gradient was not finite on some rank: then no rank reduces or steps, so the step leaves no trace."""
        batches = [next(it) for _ in range(self.tc.grad_accum)]
        with self.engine.coalesce_grad_reduction():
            loss, metrics = self.step_fn(self.engine, batches)  # a float every rank agrees on
            bad = not math.isfinite(loss) or any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                                                 for p in self._trainable)
            if self._agree(float(bad)):
                for p in self._trainable:  # the reduction on leaving the block then finds nothing to reduce
                    p.grad = None
                return None
        self.nonfinite = 0
        self._engine_step(True)
        return loss, metrics, sum(_samples(b) for b in batches)

    def _engine_step(self, boundary: bool) -> None:
        """DeepSpeed's step (an optimizer step at an accumulation boundary, else the micro-step's bookkeeping), with
        the expert optimizer around it at a boundary: the experts' norm first, as DeepSpeed's step clips by both
        (experts.py), then their update."""
        if boundary and self.experts:
            self.experts.reduce()
        self.engine.step()
        if boundary and self.experts:
            self.experts.apply()

    def _eval(self) -> Dict:
        self.engine.eval()
        with torch.no_grad():
            res = self.eval_fn(self.engine)
        self.engine.train()
        if self.writer:
            for k, v in res.items():
                self.writer.add_scalar(f"valid/{k}", v, self.step)
        return res
