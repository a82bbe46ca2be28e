"""The structure-aware encoder's costs: reading structures, the step with vs without the distance bias, and the
memory of the [L, L, kernels] expansion.

    python bench/bench_structure.py [--files 300] [--length 300] [--seq 256] [--steps 5]

1. Records/s of `data_tools.structures.read_structure` (gemmi: parse + align to the record's sequence + checks)
   on AlphaFold-style models written here and on the shared PDB/mmCIF files, beside Biopython's parsers alone
   (C-alpha coordinates, no alignment) on the same bytes.
2. Forward + backward of an ESM-2-35M-shaped encoder (12 layers, 480 wide, 20 heads, 128 kernels), all weights
   trained (the warm-up's setting), on random folds: with the bias vs the plain encoder (ratio, same run).
3. Peak memory of the distance bias alone at L=1021 with ESM-2-3B's 40 heads and 2560 width, forward + backward,
   the expansion whole (chunk 1021) vs 128 rows at a time under activation checkpointing: each in its own process
   (peak RSS above the inputs).
"""
import argparse
import gzip
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared", "data", "structures")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _biopython_ca(data: bytes, name: str):
    from Bio.PDB import MMCIFParser, PDBParser
    text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    handle = io.StringIO(text.decode())
    parser = MMCIFParser(QUIET=True) if text.lstrip().startswith(b"data_") else PDBParser(QUIET=True)
    st = parser.get_structure(name, handle)
    model = next(iter(st))
    return [r["CA"].coord for ch in model for r in ch if "CA" in r]


def reading(files: int, length: int, tmp: str) -> list:
    from data_tools import structures as S
    from tests.synthetic import fold_coords, write_pdb
    rng = random.Random(0)
    af = []
    for i in range(files):
        seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length))
        p = os.path.join(tmp, f"AF-B{i:05d}-F1-model_v4.pdb")
        write_pdb(p, f"B{i:05d}", seq, fold_coords("alpha helix", length, rng), [80.0] * length)
        af.append((open(p, "rb").read(), p, f"B{i:05d}", seq, None))
    shared = []
    if os.path.isdir(SHARED):
        for f in sorted(os.listdir(SHARED)):
            p = os.path.join(SHARED, f)
            data = open(p, "rb").read()
            for name, seq in S.seqres_chains(S.parse_structure(data, p)):
                shared.append((data, p, f, seq, name))
    rows = []
    for what, items in (("AlphaFold-style PDB, %d residues" % length, af), ("shared PDB/mmCIF chains (gz)", shared)):
        if not items:
            continue
        t = time.perf_counter()
        for data, p, acc, seq, chain in items:
            S.read_structure(data, p, acc, seq, chain)
        ours = len(items) / (time.perf_counter() - t)
        t = time.perf_counter()
        for data, p, acc, seq, chain in items:
            _biopython_ca(data, acc)
        bio = len(items) / (time.perf_counter() - t)
        rows.append((what, len(items), ours, bio))
    return rows


def worker_step(a) -> dict:
    import torch
    from megatron_p2t.models.esm import ESMConfig, ESMEncoder
    from megatron_p2t.models.esm_structure import StructureESMEncoder
    from megatron_p2t.models.parts_config import StructureConfig
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    from tests.synthetic import fold_coords
    state.initialize(ParallelConfig())
    torch.manual_seed(0)
    cfg = ESMConfig(12, 480, 20, 1920)
    rng = random.Random(0)
    b, s = a.batch, a.seq + 2
    ids = torch.randint(4, 24, (b, s))
    mask = torch.ones(b, s, dtype=torch.bool)
    coords = torch.zeros(b, s, 3)
    known = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        coords[i, 1:-1] = torch.from_numpy(fold_coords("alpha helix", a.seq, rng))
        known[i, 1:-1] = True
    plain = ESMEncoder(cfg)
    biased = StructureESMEncoder(cfg, StructureConfig(kernels=128, chunk=a.chunk))
    out = {}
    for name, m, kw in (("plain", plain, {}), ("bias", biased, {"coords": coords, "coords_mask": known})):
        times = []
        for _ in range(a.steps + 1):
            t = time.perf_counter()
            m(ids, mask, **kw).float().square().mean().backward()
            times.append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
        out[name] = statistics.median(times[1:])
    state.destroy()
    return out


def worker_memory(a) -> dict:
    import torch
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.models.esm_structure import DistanceBias
    from megatron_p2t.models.esm import transformer_config
    from megatron_p2t.models.parts_config import StructureConfig
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    from tests.synthetic import fold_coords
    state.initialize(ParallelConfig())
    esm = ESMConfig(36, 2560, 40, 10240)
    m = DistanceBias(StructureConfig(kernels=128, chunk=a.chunk), esm, transformer_config(esm, 1))
    L = 1021
    coords = torch.from_numpy(fold_coords("alpha helix", L, random.Random(0)))[None]
    known = torch.ones(1, L, dtype=torch.bool)
    base = rss_mb()
    t = time.perf_counter()
    bias, extra = m(coords, known)
    (bias.square().mean() + extra.square().mean()).backward()
    secs = time.perf_counter() - t
    state.destroy()
    return {"peak_above_inputs_mb": rss_mb() - base, "seconds": secs,
            "bias_mb": bias.numel() * bias.element_size() / 2**20}


def launch(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + random.randrange(1000)), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["step", "memory"])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=128)
    a = ap.parse_args()
    if a.worker == "step":
        print(json.dumps(worker_step(a)))
        return
    if a.worker == "memory":
        print(json.dumps(worker_memory(a)))
        return
    from bench.common import machine
    print(f"# structure-aware encoder benchmark -- {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        rows = reading(a.files, a.length, tmp)
    print("## 1. reading structures (records/s)\n")
    print("| input | records | ours: gemmi parse + align + checks | Biopython parse + CA only | ratio |")
    print("|---|---|---|---|---|")
    for what, n, ours, bio in rows:
        print(f"| {what} | {n} | {ours:,.0f} | {bio:,.0f} | {ours / bio:.2f}x |")
    step = launch("--worker", "step", "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps))
    print(f"\n## 2. forward+backward, ESM-2-35M shape, batch {a.batch} x {a.seq} residues, median of {a.steps}\n")
    print("| encoder | step s | vs plain |\n|---|---|---|")
    print(f"| ESM-2 | {step['plain']:.3f} | 1.00x |")
    print(f"| ESM-2 + distance bias (128 kernels) | {step['bias']:.3f} | {step['bias'] / step['plain']:.2f}x |")
    whole, chunked = launch("--worker", "memory", "--chunk", "1021"), launch("--worker", "memory", "--chunk", "128")
    expansion = 1021 * 1021 * 128 * 4 / 2**20
    print(f"\n## 3. distance bias at L=1021, 128 kernels, 40 heads (ESM-2-3B), forward+backward, fp32\n")
    print(f"[L, L, kernels] expansion: {expansion:,.0f} MB per protein; the bias kept: {chunked['bias_mb']:,.0f} MB\n")
    print("| rows at a time | peak RSS above inputs (MB) | seconds |\n|---|---|---|")
    print(f"| 1021 (whole) | {whole['peak_above_inputs_mb']:,.0f} | {whole['seconds']:.2f} |")
    print(f"| 128 (checkpointed chunks) | {chunked['peak_above_inputs_mb']:,.0f} | {chunked['seconds']:.2f} |")


if __name__ == "__main__":
    main()
