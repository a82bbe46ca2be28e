"""What model.recompute costs and saves: stage-2 steps of a LLaMA-shaped decoder (frozen, LoRA r 16 on every linear,
as stage 2 trains it) on packed rows, with every layer's activations kept vs recomputed in backward.

    python bench/bench_recompute.py [--hidden 512] [--layers 8] [--tokens 4096] [--steps 4]

Each setting runs twice, each time in its own process (a world of one, gloo): a warm-up step, then the measured
steps. Reported: the median step time (with glibc's default allocator), and the peak resident memory of the steps
above what the process held after the warm-up step, measured in the other process with glibc told to hand freed
memory back at once (so the peak is live bytes: the saved activations and the backward's transients; that
setting costs system time, so it is not timed), beside what `megatron-p2t plan`'s activation model gives for the
same shapes.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = {"kept": [], "full, uniform x 1": ["model.recompute.granularity=full"],
            "full, uniform x 2": ["model.recompute.granularity=full", "model.recompute.num_layers=2"],
            "full, block (half the layers)": ["model.recompute.granularity=full", "model.recompute.method=block"]}


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(a, overrides):
    import torch
    from transformers import LlamaConfig

    from megatron_p2t.config import load_config
    from megatron_p2t.parts.assemble import build
    from megatron_p2t.models.lora import apply_lora
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    layout = state.initialize(ParallelConfig())
    hf = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                     num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                     max_position_embeddings=a.tokens, rope_theta=500000.0, tie_word_embeddings=False)
    if "model.recompute.method=block" in overrides:
        overrides = overrides + [f"model.recompute.num_layers={a.layers // 2}"]
    cfg = load_config(None, ["model.encoder=none", "model.connector=none", "instruct.template=plain",
                             "model.llm_lora.dropout=0.0", *overrides])
    torch.manual_seed(0)
    model = build(cfg.model, layout, hf, None, None, placeholder_id=0)
    apply_lora(model.llm, cfg.model.llm_lora, "llm")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (1, a.tokens), generator=g)
    seg = (torch.arange(a.tokens) // a.sample + 1)[None]            # one row of samples back to back
    pos = torch.arange(a.tokens)[None]

    def step():
        loss = model(ids, pos, attention_mask=seg, labels=ids).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()                                                          # allocates AdamW's state, warms kernels
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                # the peak from here on is the timed steps'
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss("VmHWM") - base

    from megatron_p2t.plan import decoder_kept_per_token
    wb, h, f, kvd = 4, a.hidden, 3 * a.hidden, a.hidden // 4
    per_token_layer = wb * (6 * h + (h + 2 * kvd) + h + 4 * f)     # plan.py's stage-2 layer at TP=1, no dropout
    predicted = a.tokens * decoder_kept_per_token(cfg.model.recompute, a.layers, h * wb, per_token_layer)
    predicted += a.tokens * a.vocab * 4 * 2                         # fp32 logits and their gradient
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak / 2 ** 20,
                      "plan_activations_mb": predicted / 2 ** 20}))
    state.destroy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=4096, help="one packed row")
    ap.add_argument("--sample", type=int, default=512, help="tokens per sample in the row")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", nargs="*")
    a = ap.parse_args()
    if a.worker is not None:
        return worker(a, a.worker)
    from bench.common import machine
    from megatron_p2t.parallel.launch_env import RENDEZVOUS
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29571", RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    live = dict(env, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = ["--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab), "--tokens",
            str(a.tokens), "--sample", str(a.sample), "--steps", str(a.steps)]
    res = {}
    for name, ov in SETTINGS.items():
        runs = []
        for e in (env, live):   # timed with the default allocator; the peak with freed memory handed back
            r = subprocess.run([sys.executable, __file__, *args, "--worker", *ov], env=e, cwd=ROOT,
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        res[name] = dict(runs[1], step_s=runs[0]["step_s"])
    print(f"decoder {a.layers} x {a.hidden} (ffn {3 * a.hidden}, vocab {a.vocab}), LoRA r 16 on frozen weights, "
          f"one packed row of {a.tokens} tokens ({a.sample}-token samples), fp32; {machine()}")
    print("| activations | step s (median) | peak MB above the model | plan's activations MB | step vs kept |")
    print("|---|---|---|---|---|")
    kept = res["kept"]["step_s"]
    for name, r in res.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | {r['plan_activations_mb']:.0f} | "
              f"{r['step_s'] / kept:.2f}x |")


if __name__ == "__main__":
    main()
