"""Stage 1's text side (the frozen LLaMA's first k layers, what `cache-text` runs over every text and stage 1 runs
without the cache): a padded batch as it is vs its real tokens only, the texts back to back with causal attention
within each (models/text_side.py's default), on the same layers and batch.

    python bench/bench_text_side.py [--hidden 512] [--layers 4] [--batch 32] [--median 120] [--steps 5]

Text lengths are log-normal around --median tokens (SwissProt function texts: a long right tail), capped at 512 as
data.max_text_tokens; the batch is padded to its longest text, as the loader gives it.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--median", type=int, default=120)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    import numpy as np
    import torch
    from transformers import LlamaConfig

    from bench.common import machine, median_seconds, world_of_one
    from megatron_p2t.models.text_side import TextPooler
    from megatron_p2t.parallel import state
    world_of_one()
    hf = LlamaConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=int(3.5 * a.hidden),
                     num_hidden_layers=a.layers + 1, num_attention_heads=8, num_key_value_heads=2,
                     max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    pooler = TextPooler(hf, layer=a.layers).eval()
    rng = np.random.default_rng(0)
    lengths = [int(np.clip(rng.lognormal(math.log(a.median), 0.6), 8, 512)) for _ in range(a.batch)]
    ids = torch.randint(0, 32000, (a.batch, max(lengths)), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]

    res = {}
    for name, unpad in (("padded batch", False), ("real tokens only (default)", True)):
        pooler.unpad = unpad
        res[name] = median_seconds(lambda: pooler(ids, mask), a.steps)
    pooler.unpad = True
    padding = 1 - sum(lengths) / (a.batch * max(lengths))
    threads = os.environ.get("OMP_NUM_THREADS", "-")
    print(f"Text side, {machine()}, torch {torch.__version__}, OMP_NUM_THREADS={threads}: "
          f"{a.layers} LLaMA layers x {a.hidden}, {a.batch} texts of {min(lengths)}-{max(lengths)} tokens (median "
          f"{int(np.median(lengths))}, padding {padding:.0%}), float32, forward, median of {a.steps}\n")
    print("| batch | forward s | texts/s |\n|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {t:.3f} | {a.batch / t:,.1f} |")
    p, u = res.values()
    print(f"\nRatio: padded / unpadded = {p / u:.2f}x")
    state.destroy()


if __name__ == "__main__":
    main()
