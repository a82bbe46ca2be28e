"""Stage 2 on CPU: real (non-padding) tokens/s and padding fraction of packed vs padded batches, measured on the
same batches in one run; then export and generation throughput of the exported model.

    python bench/bench_instruct.py --manifest M --tokenizer T --tiny DIR   (DIR from `megatron-p2t make-tiny-models`)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def packed_vs_padded(cfg, batches: int):
    from megatron_p2t.data.loader import ProteinTextLoader
    from megatron_p2t.parallel import state
    from megatron_p2t.training import joined
    layout = state.initialize(cfg.parallel)
    model, *_ = joined.build(cfg, layout)
    ld = joined.make_loader(cfg, layout)
    raws = []
    for b in ProteinTextLoader(cfg.data, dp_rank=0, dp_size=1):
        raws.append(b)
        if len(raws) == batches:
            break
    out = {}
    for pack in (False, True, False, True):  # twice each, interleaved; the second pair is reported
        ld.cfg.pack = pack
        real = slots = rows = 0
        t0 = time.perf_counter()
        for raw in raws:
            b = ld.convert(raw)
            loss, _ = joined.forward_loss(model, b)
            loss.backward()
            real += int(b["lengths"].sum())
            slots += b["input_ids"].numel()
            rows += b["input_ids"].shape[0]
        dt = time.perf_counter() - t0
        out["packed" if pack else "padded"] = {"tokens_per_s": real / dt, "padding_fraction": 1 - real / slots,
                                               "seconds": dt, "rows_per_batch": rows / len(raws),
                                               "token_slots_per_batch": slots / len(raws)}
    state.destroy()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="training steps before export")
    ap.add_argument("--pack-length", type=int, default=2048)
    a = ap.parse_args()
    from bench.common import machine
    from megatron_p2t.config import load_config
    ov = [f"data.manifest={a.manifest}", f"data.text_tokenizer={a.tokenizer}", f"model.encoder_path={a.tiny}/esm",
          f"model.llama={a.tiny}/llama", "instruct.init_from=", "model.llm_lora.dropout=0.0", "data.batch_size=16",
          f"instruct.pack_length={a.pack_length}"]
    cfg = load_config(os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"), ov)
    res = {"machine": machine(), "packing": packed_vs_padded(cfg, a.batches)}
    res["packing"]["speedup"] = res["packing"]["packed"]["tokens_per_s"] / res["packing"]["padded"]["tokens_per_s"]
    print(json.dumps(res["packing"]), flush=True)

    # this process joined a one-rank world above: its rendezvous variables must not leak into the children
    from megatron_p2t.parallel.launch_env import RENDEZVOUS
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    work = tempfile.mkdtemp(prefix="bench_instruct_")
    cli = [sys.executable, "-m", "megatron_p2t"]
    subprocess.run(cli + ["instruct", "--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"), *ov,
                          f"train.steps={a.steps}", f"train.save_every={a.steps}", f"train.save_dir={work}/run"],
                   env=env, cwd=ROOT, check=True, capture_output=True)
    t0 = time.perf_counter()
    subprocess.run(cli + ["export", "--checkpoint", f"{work}/run", "--out", f"{work}/hf"], env=env, cwd=ROOT,
                   check=True, capture_output=True)
    export_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{work}/hf") for f in fs)
    res["export"] = {"seconds_including_start": export_s, "megabytes": size / 2 ** 20}

    from megatron_p2t.inference import generate
    for beams in (1, 4):
        out = f"{work}/preds_beam{beams}.jsonl"
        t0 = time.perf_counter()
        g = generate.run(f"{work}/hf", a.manifest, out, split="test", num_beams=beams, max_new_tokens=64,
                         batch_size=8)
        dt = time.perf_counter() - t0
        res[f"generate_beam{beams}"] = {"proteins_per_s": g["generated"] / dt, "seconds": dt,
                                        "proteins": g["generated"]}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
