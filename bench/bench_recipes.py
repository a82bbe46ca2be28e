"""Stage 2 of both recipes on the same batches (CPU): Prot2Text-V2's projector puts L+2 vectors per protein into
the prompt, Protein2Text's resampler a fixed number of latents (128). Same tiny towers, same proteins and texts,
same packing; forward + backward of each batch, timed after a warm-up pass. Reports real (non-padding) tokens/s,
samples/s, prompt slots per protein and the padding fraction, and the resampler/projector ratios.

    python bench/bench_recipes.py --manifest M --tokenizer T --tiny DIR   (DIR from `megatron-p2t make-tiny-models`)
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RECIPES = {
    "prot2text_v2 (mlp, L+2 slots)": ["model.connector=mlp"],
    # Protein2Text's 128 latents, depth 2, feed-forward x2; heads sized to the tiny ESM's width (48 = 4 x 12)
    "protein2text (resampler, 128 slots)": ["model.connector=resampler", "model.esm_output_layer=-2",
                                            "model.resampler={latents: 128, depth: 2, heads: 4, head_dim: 12, "
                                            "ff_mult: 2}"],
}


def measure(cfg, raws, pack: bool) -> dict:
    from megatron_p2t.parallel import state
    from megatron_p2t.training import joined
    layout = state.initialize(cfg.parallel)
    model, *_ = joined.build(cfg, layout)
    ld = joined.make_loader(cfg, layout)
    ld.cfg.pack = pack
    batches = [ld.convert(r) for r in raws]
    res = {}
    for rep in ("warm-up", "timed"):
        real = slots = samples = prot = 0
        t0 = time.perf_counter()
        for b in batches:
            loss, _ = joined.forward_loss(model, b)
            loss.backward()
            real += int(b["lengths"].sum())
            slots += b["input_ids"].numel()
            samples += len(b["keys"])
            prot += int((b["input_ids"] == model.placeholder_id).sum())
        dt = time.perf_counter() - t0
        res = {"tokens_per_s": real / dt, "samples_per_s": samples / dt, "seconds": dt,
               "padding_fraction": 1 - real / slots, "tokens_per_sample": real / samples,
               "prompt_slots_per_protein": prot / samples, "rows_per_batch": sum(b["input_ids"].shape[0]
                                                                                 for b in batches) / len(batches)}
    state.destroy()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-residues", type=int, default=1021)
    ap.add_argument("--pack-length", type=int, default=4096)
    a = ap.parse_args()
    from bench.common import machine
    from megatron_p2t.config import load_config
    from megatron_p2t.data.loader import ProteinTextLoader
    ov = [f"data.manifest={a.manifest}", f"data.text_tokenizer={a.tokenizer}", f"model.encoder_path={a.tiny}/esm",
          f"model.llama={a.tiny}/llama", "instruct.init_from=", "model.llm_lora.dropout=0.0",
          f"data.batch_size={a.batch_size}", f"data.max_protein_residues={a.max_residues}",
          f"instruct.pack_length={a.pack_length}"]
    base = os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml")
    cfg = load_config(base, ov)
    raws = []
    for b in ProteinTextLoader(cfg.data, dp_rank=0, dp_size=1):   # the same raw batches for every recipe
        raws.append(b)
        if len(raws) == a.batches:
            break
    res = {"machine": machine(), "batches": a.batches, "batch_size": a.batch_size, "max_residues": a.max_residues}
    for pack in (True, False):
        mode = "packed" if pack else "padded"
        res[mode] = {name: measure(load_config(base, ov + extra), raws, pack) for name, extra in RECIPES.items()}
        mlp, resampler = res[mode].values()
        res[mode]["resampler / projector"] = {k: resampler[k] / mlp[k] for k in
                                             ("tokens_per_s", "samples_per_s", "tokens_per_sample")}
        print(json.dumps({mode: res[mode]}), flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
