"""ESM's attention and padding: megatron-core's local unfused DotProductAttention on the padded batch (what the
encoders ran before), SDPA over the padding mask (transformer/padded_attention.py), and the real tokens only,
proteins back to back with attention within each (models/esm.py's default, `unpad`), on the same layers and batch.

    python bench/bench_esm_attention.py [--hidden 480] [--heads 20] [--layers 6] [--length 512] [--batch 4]

Two steps are measured, each a median over --steps after a warm-up:
- frozen: the forward under no_grad (ESM in stage 2, and in stage 1 without ESM's LoRA);
- trained through: forward + backward with the input needing a gradient (ESM's LoRA in stage 1, the structure
  encoder's distance bias), with what autograd keeps for backward counted by its saved-tensor hooks (each storage
  once) and megatron's scores buffer (a global it keeps allocated between steps) beside it.
Proteins in the batch have lengths length, 0.8, 0.6 and 0.5 x length (padded to the longest), as a sorted batch.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=480)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    import torch
    from megatron.core import parallel_state

    from bench.common import machine, median_seconds, set_core_attention, unfused_core_attention, world_of_one
    from megatron_p2t.models.esm import ESMConfig, ESMEncoder
    from megatron_p2t.parallel import state
    world_of_one()
    torch.manual_seed(0)
    enc = ESMEncoder(ESMConfig(a.layers, a.hidden, a.heads, 4 * a.hidden)).train()
    sdpa = [layer.self_attention.core_attention for layer in enc.block.layers]
    unfused = unfused_core_attention(enc.block)

    g = torch.Generator().manual_seed(1)
    L = a.length + 2
    lengths = [max(1, int(L * f)) for f in (1.0, 0.8, 0.6, 0.5)][:a.batch] + [L] * max(0, a.batch - 4)
    ids = torch.randint(4, 24, (a.batch, L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    x0 = enc.embed(ids, mask).detach()            # [b, s, h]
    unpadded = False

    def run(x):
        if unpadded:
            return enc.run_unpadded(x, mask)
        return enc.run_block(x.transpose(0, 1).contiguous(), ids, mask)

    def frozen():
        with torch.no_grad():
            run(x0)

    def trained():
        x = x0.clone().requires_grad_()
        run(x).square().mean().backward()

    def kept_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = x0.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run(x)
        params = {p.untyped_storage().data_ptr() for p in enc.parameters()}
        del y
        return sum(n for ptr, n in seen.items() if ptr not in params)

    res = {}
    for name, modules, unpadded in (("megatron-core unfused, padded", unfused, False), ("SDPA, padded", sdpa, False),
                                    ("SDPA per protein, unpadded (default)", sdpa, True)):
        set_core_attention(enc.block, modules)
        res[name] = {"frozen": median_seconds(frozen, a.steps), "trained": median_seconds(trained, a.steps),
                     "kept": kept_bytes(), "buffer": 0}
    buf = sum(t.numel() * t.element_size() for t in parallel_state.get_global_memory_buffer().buffer.values())
    res["megatron-core unfused, padded"]["buffer"] = buf

    print(f"ESM core attention, {machine()}, torch {torch.__version__}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}: {a.layers} layers x {a.hidden} ({a.heads} heads), batch "
          f"{a.batch}, lengths {lengths} (padding {1 - sum(lengths) / (a.batch * L):.0%}), float32, median of "
          f"{a.steps} steps\n")
    print("| attention, batch | frozen forward s | forward+backward s | kept for backward MiB | scores buffer MiB |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['frozen']:.3f} | {r['trained']:.3f} | {r['kept'] / 2**20:.1f} | "
              f"{r['buffer'] / 2**20:.1f} |")
    u, s, p = res.values()
    print(f"\nRatios: unfused / SDPA padded: frozen forward {u['frozen'] / s['frozen']:.2f}x, forward+backward "
          f"{u['trained'] / s['trained']:.2f}x, kept {u['kept'] / s['kept']:.2f}x; padded / unpadded (SDPA): "
          f"{s['frozen'] / p['frozen']:.2f}x, {s['trained'] / p['trained']:.2f}x, kept {s['kept'] / p['kept']:.2f}x; "
          f"unfused padded / unpadded: {u['frozen'] / p['frozen']:.2f}x, {u['trained'] / p['trained']:.2f}x")
    state.destroy()


if __name__ == "__main__":
    main()
