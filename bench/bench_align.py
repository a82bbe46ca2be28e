"""Stage 1 on CPU: samples/s with vs without the text cache, and DP=2 step time with local-only vs
all-gathered negatives, with peak memory per rank -- each pair measured in one run.

    python bench/bench_align.py --manifest M --tokenizer T --tiny DIR   (DIR from `megatron-p2t make-tiny-models`)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def align(nproc, overrides, save_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, 2 // nproc)), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", "--save-dir", save_dir, *overrides]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return [json.load(open(os.path.join(save_dir, f"bench_rank{i}.json"))) for i in range(nproc)]


def worker(save_dir, overrides):
    import resource
    import time

    import torch.distributed as dist

    from megatron_p2t.config import load_config
    from megatron_p2t.training import driver, stages
    cfg = load_config(os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"),
                      overrides + [f"train.save_dir={save_dir}", "train.save_every=100000", "train.tensorboard=false"])
    t0 = time.perf_counter()
    result = driver.run(stages.for_command("align", cfg), cfg)
    wall = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {"wall_s": wall, "steps": result["step"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(save_dir, f"bench_rank{rank}.json"), "w") as f:
        json.dump(out, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--save-dir")
    ap.add_argument("--manifest")
    ap.add_argument("--tokenizer")
    ap.add_argument("--tiny")
    ap.add_argument("--steps", type=int, default=40)
    a, rest = ap.parse_known_args()
    if a.worker:
        return worker(a.save_dir, rest)
    from bench.common import machine
    base = [f"data.manifest={a.manifest}", f"data.text_tokenizer={a.tokenizer}", f"model.encoder_path={a.tiny}/esm",
            f"model.llama={a.tiny}/llama", f"train.steps={a.steps}", "data.batch_size=16", "train.eval_every=0"]
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-m", "megatron_p2t", "cache-text", "--config",
                    os.path.join(ROOT, "configs", "align_tiny_cpu.yaml"), *base], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    tmp = tempfile.mkdtemp(prefix="p2t-align-bench-")
    print(f"# stage-1 benchmark -- {machine()}; tiny random ESM-2 (3 layers, h=48) / LLaMA-3 (text layer 2 of 4, "
          f"h=64), batch 16 per rank, {a.steps} steps incl. start-up and the final validation pass\n")
    rows = []
    for name, nproc, extra in (("1 process, text side computed", 1, []),
                               ("1 process, text cache", 1, ["align.use_text_cache=true"]),
                               ("DP=2, local negatives only", 2, ["align.use_text_cache=true",
                                                                   "align.gather_negatives=false"]),
                               ("DP=2, all-gathered negatives", 2, ["align.use_text_cache=true"])):
        rs = align(nproc, base + extra, os.path.join(tmp, name.replace(" ", "_").replace(",", "")))
        wall = max(r["wall_s"] for r in rs)
        rows.append((name, nproc, wall, a.steps * 16 * nproc / wall, max(r["peak_rss_mb"] for r in rs)))
    print("| run | processes | wall s | samples/s | peak RSS per rank MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.0f} |")
    print(f"\nratios: text cache vs computed = {rows[1][3] / rows[0][3]:.2f}x samples/s; "
          f"all-gathered vs local negatives at DP=2 = {rows[3][2] / rows[2][2]:.3f}x wall time")


if __name__ == "__main__":
    main()
