"""Flat-file parsing + cleaning + shard writing throughput, per process and with more processes, beside
Biopython's SwissProt parser doing the same reading and cleaning (the naive alternative), in one run.

    python bench/bench_data_build.py [--copies 8]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, replicated_flatfile  # noqa: E402
from data_tools.build import BuildOptions, _pool, _write_shard_task, stage_records  # noqa: E402
from data_tools.clean import CleanOptions, clean  # noqa: E402
from data_tools.records import ProteinRecord  # noqa: E402


def biopython_parse_clean(path, opts):
    from Bio import SwissProt
    kept = 0
    with open(path) as f:
        for r in SwissProt.parse(f):
            fn = " ".join(c[len("FUNCTION: "):] for c in r.comments if c.startswith("FUNCTION:"))
            rec = ProteinRecord(accession=r.accessions[0], sequence=r.sequence, function=fn,
                                reviewed=r.data_class == "Reviewed", organism=r.organism)
            kept += clean(rec, opts)[0] is not None
    return kept


def time_records(path, processes, work):
    os.makedirs(work, exist_ok=True)
    opts = BuildOptions(inputs=[path], out=work, processes=processes, quiet=True)
    t = time.perf_counter()
    rep = stage_records(opts, work)
    return time.perf_counter() - t, rep


def time_shards(work, processes, per_shard=2000):
    import numpy as np
    offsets = np.load(os.path.join(work, "offsets.npy"))
    rp = os.path.join(work, "records.jsonl")
    out = os.path.join(work, f"shards{processes}")
    os.makedirs(out, exist_ok=True)
    tasks = [(rp, offsets[i:i + per_shard], os.path.join(out, f"train-{i // per_shard:06d}.tar"))
             for i in range(0, len(offsets), per_shard)]
    t = time.perf_counter()
    pool = _pool(processes)
    res = list(pool.imap_unordered(_write_shard_task, tasks)) if pool else list(map(_write_shard_task, tasks))
    if pool:
        pool.close()
        pool.join()
    return time.perf_counter() - t, sum(r["count"] for r in res), sum(r["bytes"] for r in res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="p2t-bench-")
    path = replicated_flatfile(tmp, a.copies)
    mb = os.path.getsize(path) / 2**20
    # warm the page cache so every contender reads from memory
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    rows = []
    t, rep = time_records(path, 1, os.path.join(tmp, "w1"))
    rows.append(("ours: parse+clean, 1 process", t, rep["records_read"]))
    t2, rep2 = time_records(path, 2, os.path.join(tmp, "w2"))
    rows.append(("ours: parse+clean, 2 processes", t2, rep2["records_read"]))
    assert rep2["kept"] == rep["kept"]
    tb = time.perf_counter()
    kept_bio = biopython_parse_clean(path, CleanOptions())
    tb = time.perf_counter() - tb
    rows.append(("Biopython SwissProt.parse + same cleaning, 1 process", tb, rep["records_read"]))
    ts1, n1, b1 = time_shards(os.path.join(tmp, "w1"), 1)
    ts2, n2, b2 = time_shards(os.path.join(tmp, "w1"), 2)
    print(f"# data build benchmark -- {machine()}")
    print(f"input: shared sample x{a.copies} = {mb:.1f} MiB unpacked flat file, {rep['records_read']:,} records, "
          f"{rep['kept']:,} kept after cleaning (Biopython path kept {kept_bio:,})\n")
    print("| stage | seconds | records/s | MB/s of flat file |")
    print("|---|---|---|---|")
    for name, t, n in rows:
        print(f"| {name} | {t:.2f} | {n / t:,.0f} | {mb / t:.1f} |")
    print(f"| ours: shard writing, 1 process | {ts1:.2f} | {n1 / ts1:,.0f} | ({b1 / 2**20 / ts1:.1f} MB/s of tar) |")
    print(f"| ours: shard writing, 2 processes | {ts2:.2f} | {n2 / ts2:,.0f} | ({b2 / 2**20 / ts2:.1f} MB/s of tar) |")
    total1 = rows[0][1] + ts1
    total2 = rows[1][1] + ts2
    print(f"| ours: parse+clean+shards, 1 process | {total1:.2f} | {rep['records_read'] / total1:,.0f} | "
          f"{mb / total1:.1f} |")
    print(f"| ours: parse+clean+shards, 2 processes | {total2:.2f} | {rep['records_read'] / total2:,.0f} | "
          f"{mb / total2:.1f} |")
    print(f"\nratios: ours (1 process) vs Biopython = {tb / rows[0][1]:.1f}x; "
          f"2 vs 1 processes (parse+clean+shards) = {total1 / total2:.2f}x")


if __name__ == "__main__":
    main()
