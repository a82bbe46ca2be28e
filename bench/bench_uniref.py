"""UniRef FASTA for language-model data: read throughput (ours vs Biopython, MB/s of uncompressed FASTA) and the
whole `data_tools build --lm-text` at two input sizes, with the build's peak memory, which must not grow with the
input (UniRef50 is tens of GB). The builds split by lists holding out 0.1% each for valid and test (ProLLaMA's
validation share), so the MMseqs2 homology check searches few sequences; clustering all of UniRef at 30% identity
(--split mmseqs) is MMseqs2's own cost (minutes per 100,000 sequences here) and memory.

    python bench/bench_uniref.py [--sequences 100000] [--scale 4]

The input is UniRef50-style (headers with n=, Tax=, TaxID=, RepID=; 60 residues a line; gzipped), with lengths
drawn from the shared SwissProt sample's and residues drawn at random, so MMseqs2 finds no clusters to merge.
"""
import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def write_uniref(path: str, n: int, lengths, seed: int = 0) -> int:
    rng = random.Random(seed)
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(n):
            seq = "".join(rng.choices(AMINO, k=rng.choice(lengths)))
            f.write(f">UniRef50_A{i:09d} Uncharacterized protein {i % 997} n={1 + i % 40} Tax=Homo sapiens "
                    f"TaxID=9606 RepID=A{i:09d}_HUMAN\n")
            f.write("".join(seq[j:j + 60] + "\n" for j in range(0, len(seq), 60)))
    with gzip.open(path, "rb") as f:
        return sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))


def read_ours(path: str) -> int:
    from data_tools.readers.rows import iter_fasta, parse_fasta_header
    n = 0
    for _, header, seq in iter_fasta(path):
        parse_fasta_header(header)
        n += 1
    return n


def read_biopython(path: str) -> int:
    from Bio import SeqIO
    from data_tools.readers.rows import parse_fasta_header
    n = 0
    with gzip.open(path, "rt") as f:
        for rec in SeqIO.parse(f, "fasta"):
            parse_fasta_header(rec.description)
            str(rec.seq)
            n += 1
    return n


BUILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from data_tools.build import BuildOptions, build
from data_tools.clean import CleanOptions
t = time.perf_counter()
from data_tools.split import SplitOptions
m = build(BuildOptions(inputs=[{path!r}], out={out!r}, quiet=True, processes=2,
                       clean=CleanOptions(lm_text="Seq=<{{sequence}}>", min_length=1, max_length=100000),
                       split=SplitOptions(mode="lists", lists={lists!r})))
print(json.dumps({{"seconds": time.perf_counter() - t, "kept": m["records"]["kept"], "splits": m["splits"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def build_in_subprocess(path: str, out: str, n: int) -> dict:
    held = max(1, n // 1000)
    os.makedirs(out, exist_ok=True)
    lists = {}
    for split, ids in (("valid", range(held)), ("test", range(held, 2 * held)), ("train", range(2 * held, n))):
        lists[split] = os.path.join(out, f"{split}.txt")
        with open(lists[split], "w") as f:
            f.writelines(f"UniRef50_A{i:09d}\n" for i in ids)
    r = subprocess.run([sys.executable, "-c", BUILD.format(root=ROOT, path=path, out=out, lists=lists)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=100_000)
    ap.add_argument("--scale", type=int, default=4, help="the second build's input is this many times larger")
    a = ap.parse_args()
    from bench.common import SAMPLE, machine
    from data_tools.readers import read_records
    lengths = [len(r.sequence) for r in read_records(SAMPLE, skip_bad=True)]
    tmp = tempfile.mkdtemp(prefix="p2t_uniref_")
    small, big = os.path.join(tmp, "small.fasta.gz"), os.path.join(tmp, "big.fasta.gz")
    mb_small = write_uniref(small, a.sequences, lengths) / 2 ** 20
    mb_big = write_uniref(big, a.sequences * a.scale, lengths, seed=1) / 2 ** 20
    print(f"# {machine()}; {a.sequences:,} sequences = {mb_small:.1f} MiB of FASTA (gzipped on disk)\n")
    res = {}
    for name, fn in (("ours (iter_fasta + UniRef header fields)", read_ours),
                     ("Biopython SeqIO.parse (+ the same header fields)", read_biopython)):
        t = time.perf_counter()
        n = fn(small)
        res[name] = mb_small / (time.perf_counter() - t)
        assert n == a.sequences
    print("| reader, one process | MB/s of FASTA |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.1f} |")
    ours, bio = res.values()
    print(f"\nratio ours / Biopython: {ours / bio:.2f}x\n")
    print("| `build --lm-text`, 2 processes | FASTA MiB | seconds | MB/s | peak RSS, main process (MiB) | "
          "peak RSS, largest child (MiB) |\n|---|---|---|---|---|---|")
    for name, path, mb, n in (("1x", small, mb_small, a.sequences), (f"{a.scale}x", big, mb_big, a.sequences * a.scale)):
        r = build_in_subprocess(path, os.path.join(tmp, f"out_{name}"), n)
        print(f"| {name} ({r['kept']:,} kept) | {mb:.1f} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['children_peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
