"""Loader throughput per rank (reading shards, ESM + text tokenisation, batching), beside the naive
alternative -- a JSONL file read with plain Python, tokenised per sample, padded per batch -- in one run.
Also the padding fraction of fixed-size batches vs token-budget batches with length bucketing.

    python bench/bench_loader.py [--samples 30000]
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import machine, replicated_flatfile  # noqa: E402
from data_tools.build import BuildOptions, build  # noqa: E402
from data_tools.split import SplitOptions  # noqa: E402
from megatron_p2t.data import esm_alphabet  # noqa: E402
from megatron_p2t.data.loader import LoaderConfig, ProteinTextLoader  # noqa: E402
from megatron_p2t.data.text_tokenizer import build_llama3_style_tokenizer, load_text_tokenizer  # noqa: E402

ESM_INDEX = {t: i for i, t in enumerate(esm_alphabet.TOKENS)}


def naive(jsonl, tok_dir, samples, batch):
    tok = load_text_tokenizer(tok_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    n, t0 = 0, time.perf_counter()
    buf = []
    while n < samples:
        with open(jsonl) as f:
            for line in f:
                r = json.loads(line)
                p = [esm_alphabet.CLS] + [ESM_INDEX.get(c, esm_alphabet.UNK) for c in r["sequence"]] + [esm_alphabet.EOS]
                t = tok(r["function"], add_special_tokens=False)["input_ids"][:511] + [eot]
                buf.append((torch.tensor(p), torch.tensor(t)))
                if len(buf) == batch:
                    torch.nn.utils.rnn.pad_sequence([b[0] for b in buf], batch_first=True, padding_value=1)
                    torch.nn.utils.rnn.pad_sequence([b[1] for b in buf], batch_first=True)
                    n += batch
                    buf = []
                    if n >= samples:
                        break
    return n / (time.perf_counter() - t0)


def ours(cfg, samples, warmup=0):
    loader = ProteinTextLoader(cfg, 0, 1)
    it = iter(loader)
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["keys"])
        if n >= warmup:
            break
    t1, n1 = time.perf_counter(), n
    for b in it:
        n += len(b["keys"])
        if n >= samples:
            break
    t2 = time.perf_counter()
    return n / (t2 - t0), (n - n1) / (t2 - t1), loader.padding_fraction()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=30000)
    ap.add_argument("--copies", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="p2t-bench-")
    flat = replicated_flatfile(tmp, a.copies)
    out = os.path.join(tmp, "shards")
    build(BuildOptions(inputs=[flat], out=out, samples_per_shard=1000, quiet=True,
                       split=SplitOptions(fractions=(1.0, 0.0, 0.0))))
    tok_dir = os.path.join(tmp, "tok")
    texts = [json.loads(l)["function"] for l in open(os.path.join(out, "work", "records.jsonl"))]
    build_llama3_style_tokenizer(texts[:5000], tok_dir, vocab_size=4096)
    base = dict(manifest=os.path.join(out, "manifest.json"), text_tokenizer=tok_dir, chunk=256, shuffle_block=2048)
    print(f"# loader benchmark -- {machine()}; {len(texts):,} samples in 1000-sample shards, "
          f"{a.samples:,} samples streamed per run\n")
    print("| loader (one rank) | samples/s incl. start | samples/s steady | padding fraction |")
    print("|---|---|---|---|")
    res = {}
    for name, kw in [("ours, 2 workers, batch 32", dict(batch_size=32, num_workers=2)),
                     ("ours, 0 workers (in process), batch 32", dict(batch_size=32, num_workers=0)),
                     ("ours, 2 workers, max_tokens 16384 (bucketed)", dict(batch_size=None, max_tokens=16384,
                                                                             num_workers=2))]:
        total, steady, pad = ours(LoaderConfig(**base, **kw), a.samples, warmup=2048)
        res[name] = steady
        print(f"| {name} | {total:,.0f} | {steady:,.0f} | {pad:.3f} |")
    nv = naive(os.path.join(out, "work", "records.jsonl"), tok_dir, a.samples // 3, 32)
    print(f"| naive: JSONL + json.loads + per-sample tokenise + pad_sequence, batch 32 | {nv:,.0f} | {nv:,.0f} | - |")
    print(f"\nratio: ours (2 workers, steady) vs naive = {res['ours, 2 workers, batch 32'] / nv:.1f}x")


if __name__ == "__main__":
    main()
