"""Measures what `megatron-p2t plan` predicts: the resident-memory peak of training steps on CPU (one process),
above what the process held before the model was built. Prints JSON {"measured": bytes, "predicted": {...}}.
Run it with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 so that freed tensors leave the resident set at
once: the peak is then live bytes (what torch.cuda.max_memory_allocated reports on a GPU), not glibc's retained
arenas, which the planner's per-device overhead stands for.

    python tests/plan_measure_main.py align|instruct --config X [overrides]
"""
import ctypes
import json
import os
import sys


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _settle() -> None:
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed load-time buffers back to the OS, so RSS is what is live


def main():
    stage, args = sys.argv[1], sys.argv[2:]
    import dataclasses

    from megatron_p2t.config import load_config
    from megatron_p2t.parallel import state
    from megatron_p2t.plan import DEVICES, plan
    from megatron_p2t.training.trainer import Trainer
    import torch._dynamo  # noqa: F401  code, not data: torch.optim's constructor imports it; in the baseline
    cfg = load_config(args[1], args[2:])
    layout = state.initialize(dataclasses.replace(cfg.parallel, tensor=1, pipeline=1, seed=1))
    os.makedirs(cfg.train.save_dir, exist_ok=True)
    if stage == "align":
        from megatron_p2t.data.loader import ProteinTextLoader
        from megatron_p2t.training.align import align_loss
        from megatron_p2t.training.stages.align_hscale import build
        loader = ProteinTextLoader(cfg.data)
        it = iter(loader)
        next(it)
        _settle()
        base = _rss("VmRSS")
        model = build(cfg, layout)
        trainer = Trainer(model, cfg, loader, lambda e, b: align_loss(e, b, cfg.align, layout.dp_group), layout,
                          micro_batch=cfg.data.batch_size)
    else:
        from megatron_p2t.training.joined import build, forward_loss, make_loader, param_groups
        loader = make_loader(cfg, layout)
        it = iter(loader)
        next(it)
        _settle()
        base = _rss("VmRSS")
        model, *_ = build(cfg, layout)

        def step(engine, batch):
            loss, n = forward_loss(engine, batch)
            return loss, {}
        trainer = Trainer(model, cfg, loader, step, layout, micro_batch=1, param_groups=param_groups(model, cfg))
    _settle()
    ready = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: the peak from here on is the training steps', not the checkpoint load's
    trainer.train()
    peak = _rss("VmHWM")
    p = plan(cfg, stage, 1, 1, DEVICES["cpu"])
    print(json.dumps({"measured": peak - base, "before_steps": ready - base, "predicted": p.memory,
                      "predicted_total": p.total}))
    state.destroy()


if __name__ == "__main__":
    main()
