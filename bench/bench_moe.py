"""The mixture-of-experts decoder's costs: dense vs 4 experts top-1 on the same tokens, and expert parallelism.

    python bench/bench_moe.py [--hidden 256] [--layers 4] [--tokens 2048] [--steps 5]

Each case runs in its own process group (torchrun, gloo on CPU) and does training steps of the decoder alone
(LLaMA-3-shaped, SwiGLU, GQA), every weight trained, AdamW: forward + backward + all-reduce of the gradients as
training reduces them (dense over the data-parallel group, experts over the expert-data-parallel one) + the
optimizer step. Reported per rank: median step time, the bytes of weights + gradients + AdamW state it holds, and
peak RSS.
1. dense (model.decoder=llama) vs MoE (4 experts, top-1, capacity 1.25), one process: the same tokens, about the
   same FLOPs (one expert per token), four times the MLP weights.
2. MoE at DP=2: EP=1 (every rank holds the 4 experts) vs EP=2 (2 each), the same tokens per rank.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(a):
    import torch

    from megatron_p2t.models import llama, llama_moe
    from megatron_p2t.models.parts_config import MoEConfig
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    from megatron_p2t.parallel.state import collective_device
    from transformers import LlamaConfig
    layout = state.initialize(ParallelConfig(expert=a.ep))
    hf = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                     num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                     max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
    moe = MoEConfig(router_init_std=0.02) if a.moe else None
    torch.manual_seed(0)
    model = llama.build(hf, layout=layout, moe=moe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = 512
    g = torch.Generator().manual_seed(layout.dp_rank)
    ids = torch.randint(0, a.vocab, (a.tokens // seq, seq), generator=g)
    pos = torch.arange(seq).expand(ids.shape[0], -1)
    times = []
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, position_ids=pos, attention_mask=None, labels=ids).float().mean()
        loss.backward()
        for p in model.parameters():
            group = layout.expert_dp_group if llama_moe.is_expert_param(p) else layout.dp_group
            if torch.distributed.get_world_size(group) > 1:
                gr = p.grad.to(collective_device())
                torch.distributed.all_reduce(gr, group=group)
                p.grad.copy_(gr / layout.dp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:        # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    llama_moe.take_router_stats(model, layout)
    held = sum(p.numel() * p.element_size() * 4 for p in model.parameters())   # weights, grads, 2 Adam moments
    out = {"rank": layout.rank, "step_s": statistics.median(times), "held_mb": held / 2 ** 20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(a.out, f"rank{layout.rank}.json"), "w") as f:
        json.dump(out, f)
    state.destroy()


def case(a, nproc: int, moe: bool, ep: int) -> list:
    out = tempfile.mkdtemp()
    args = [__file__, "--worker", "--out", out, "--ep", str(ep), "--hidden", str(a.hidden), "--layers",
            str(a.layers), "--tokens", str(a.tokens), "--steps", str(a.steps), "--vocab", str(a.vocab)]
    if moe:
        args.append("--moe")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step (rows of 512)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    rows = [("dense, 1 process", case(a, 1, False, 1)), ("MoE 4x top-1, 1 process", case(a, 1, True, 1)),
            ("MoE, DP=2 EP=1", case(a, 2, True, 1)), ("MoE, DP=2 EP=2", case(a, 2, True, 2))]
    print(f"decoder {a.layers} x {a.hidden} (ffn {4 * a.hidden}), {a.tokens} tokens per rank per step, "
          f"{os.cpu_count()} CPU cores")
    print("| case | step s (median, rank 0) | weights+grads+Adam MB per rank | peak RSS MB per rank | parameters |")
    print("|---|---|---|---|---|")
    for name, ranks in rows:
        r0 = ranks[0]
        print(f"| {name} | {r0['step_s']:.3f} | {r0['held_mb']:.1f} | {max(r['peak_rss_mb'] for r in ranks):.0f} | "
              f"{r0['params']:,} |")
    d, m, e1, e2 = (r[1][0] for r in rows)
    print(f"\nMoE / dense: step {m['step_s'] / d['step_s']:.2f}x, memory held {m['held_mb'] / d['held_mb']:.2f}x")
    print(f"EP=2 / EP=1: step {e2['step_s'] / e1['step_s']:.2f}x, memory held {e2['held_mb'] / e1['held_mb']:.2f}x")


if __name__ == "__main__":
    main()
