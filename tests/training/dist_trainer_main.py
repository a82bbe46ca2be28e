"""Run by test_trainer.py under torchrun (DP=2): the trainer's two step modes (micro-batch steps through
engine.backward; whole steps whose backward runs outside DeepSpeed, as a pipeline schedule's does) at ZeRO-1 and
ZeRO-2, each with and without a non-finite micro-batch on one rank. Writes every run's final weights, losses and
skip count to WORK/results.pt."""
import argparse
import os

import torch
import torch.distributed as dist


class Batches:
    """Fixed batches per rank, with the resumable position the trainer saves."""

    def __init__(self, batches):
        self.batches, self.n = batches, 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]

    def __iter__(self):
        while True:
            self.n += 1
            yield self.batches[(self.n - 1) % len(self.batches)]


def run(mode: str, zero: int, nan_at: int, out: str, layout) -> dict:
    """Four steps of 3 micro-batches at DP=2; nan_at >= 0 puts a micro-batch non-finite on rank 1 only there."""
    from megatron_p2t.config import load_config
    from megatron_p2t.training.trainer import Trainer
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    accum = 3
    cfg = load_config(os.path.join(root, "configs", "align_tiny_cpu.yaml"),
                      [f"train.zero_stage={zero}", f"train.grad_accum={accum}", "train.steps=4", "train.lr=0.05",
                       "train.save_every=100", "train.tensorboard=false", f"train.save_dir={out}",
                       "train.max_nonfinite_in_a_row=1"])
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    g = torch.Generator().manual_seed(10 + rank)
    data = [{"x": torch.randn(4, 6, generator=g), "y": torch.randn(4, 3, generator=g), "keys": ["k"] * 4}
            for _ in range(4 * accum)]
    if nan_at >= 0:  # the ranks must agree to skip although only rank 1 sees it
        bad = dict(data[nan_at], x=data[nan_at]["x"] * (float("nan") if rank == 1 else 1.0))
        # one micro-batch in micro mode; a whole step's worth in whole mode, so what follows lines up with the
        # clean run
        data[nan_at:nan_at] = [dict(bad) for _ in range(1 if mode == "micro" else accum)]

    def loss_of(m, b):
        return torch.nn.functional.mse_loss(m(b["x"]), b["y"])

    def micro_step(engine, b):
        return loss_of(engine, b), {}

    def whole_step(engine, batches):  # what the pipeline schedule does: forward and backward, scaled by 1/n
        total = 0.0
        for b in batches:
            loss = loss_of(engine.module, b)
            (loss / len(batches)).backward()
            total += float(loss.detach())
        return total / len(batches), {}

    os.makedirs(out, exist_ok=True)
    tr = Trainer(model, cfg, Batches(data), whole_step if mode == "whole" else micro_step, layout,
                 whole_step=mode == "whole")
    res = tr.train()
    return {"weights": {k: v.detach().clone() for k, v in tr.engine.module.state_dict().items()},
            "losses": res["losses"], "skipped": res["nonfinite_skipped"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work")
    a = ap.parse_args()
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    layout = state.initialize(ParallelConfig())
    results = {}
    for mode in ("micro", "whole"):
        for zero in (1, 2):
            for nan_at in (-1, 3):  # 3: the first micro-batch of step 2
                key = f"{mode}-zero{zero}-nan{nan_at}"
                results[key] = run(mode, zero, nan_at, os.path.join(a.work, key), layout)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(a.work, "results.pt"))
    state.destroy()


if __name__ == "__main__":
    main()
