"""Run by torchrun from test_loader_distributed.py: each rank streams its share and writes what it saw."""
import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

from megatron_p2t.data.loader import LoaderConfig, ProteinTextLoader


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--manifest")
    p.add_argument("--tokenizer")
    p.add_argument("--out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume-after", type=int, default=-1)
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from megatron_p2t.parallel import state as parallel_state
    from megatron_p2t.parallel.layout import ParallelConfig
    layout = parallel_state.initialize(ParallelConfig(tensor=a.tp))
    cfg = LoaderConfig(manifest=a.manifest, text_tokenizer=a.tokenizer, batch_size=8, num_workers=a.workers,
                       chunk=10, shuffle_block=64, epochs=1, seed=7)
    loader = ProteinTextLoader(cfg, layout.dp_rank, layout.dp)  # tensor-parallel peers read the same data
    batches = []
    state = None
    for i, b in enumerate(loader):
        dist.all_reduce(torch.ones(1))  # a collective per step: unequal step counts would hang here
        batches.append({"keys": b["keys"], "valid": b["valid"].tolist(),
                        "sum": int(b["protein_ids"].sum() + b["text_ids"].sum())})
        if i == a.resume_after:
            state = loader.state_dict()
            break
    resumed = []
    if state is not None:
        for b in ProteinTextLoader(cfg, layout.dp_rank, layout.dp, state=state):
            dist.all_reduce(torch.ones(1))
            resumed.append({"keys": b["keys"], "valid": b["valid"].tolist(),
                            "sum": int(b["protein_ids"].sum() + b["text_ids"].sum())})
    with open(os.path.join(a.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"dp": [loader.dp_rank, loader.dp_size], "batches": batches, "resumed": resumed}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
