"""The nearest-neighbour baselines of `evaluate`: MMseqs2 against BLAST on the same queries and training set,
in one run: wall time, queries/s, hits, and how often the two name the same training protein.

The training set is the SwissProt sample's train split, grown --copies times with each copy's residues mutated
at --mutate (so the copies are homologues, not duplicates); the queries are the held-out valid + test proteins
and as many training proteins mutated the same way (so there are hits to find).

    python bench/bench_baselines.py [--copies 8] [--threads 2]
"""
import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import SAMPLE, machine  # noqa: E402
from megatron_p2t.evaluation import text as evaluation  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"


def mutate(seq: str, rate: float, rng: random.Random) -> str:
    return "".join(rng.choice(AA) if rng.random() < rate else c for c in seq)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--mutate", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from data_tools.build import BuildOptions, build
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        build(BuildOptions(inputs=[SAMPLE], out=os.path.join(tmp, "data"), skip_bad=True, quiet=True))
        manifest = os.path.join(tmp, "data", "manifest.json")
        train = [(k, s) for k, s, _, _ in evaluation.split_records(manifest, "train")]
        held = [(k, s) for split in ("valid", "test") for k, s, _, _ in evaluation.split_records(manifest, split)]
        db = list(train) + [(f"{k}_c{c}", mutate(s, a.mutate, rng)) for c in range(1, a.copies) for k, s in train]
        queries = held + [(f"{k}_q", mutate(s, a.mutate, rng)) for k, s in rng.sample(train, len(held))]
        print(f"machine: {machine()}; training set {len(db):,} proteins ({sum(len(s) for _, s in db):,} residues), "
              f"{len(queries)} queries ({len(held)} held out, {len(queries) - len(held)} mutated members at "
              f"{a.mutate:.0%}), {a.threads} threads")
        res = {}
        for tool, fn in evaluation.BASELINES.items():
            t = time.perf_counter()
            hits = fn(queries, db, a.threads)
            res[tool] = (time.perf_counter() - t, hits)
    print("\n| tool | s | queries/s | hits (held out) | hits (mutated members) |\n|---|---|---|---|---|")
    held_keys = {k for k, _ in held}
    for tool, (s, hits) in res.items():
        print(f"| {tool} | {s:.2f} | {len(queries) / s:,.1f} | {sum(k in held_keys for k in hits)} / {len(held)} | "
              f"{sum(k not in held_keys for k in hits)} / {len(queries) - len(held)} |")
    (ms, mh), (bs, bh) = res["mmseqs"], res["blast"]
    both = [k for k in mh if k in bh]
    same = sum(mh[k][0].split("_c")[0] == bh[k][0].split("_c")[0] for k in both)
    print(f"\nRatio: MMseqs2 / BLAST = {bs / ms:.2f}x queries/s. Where both found a hit ({len(both)} queries) they "
          f"name the same training protein or a copy of it for {same}.")


if __name__ == "__main__":
    main()
