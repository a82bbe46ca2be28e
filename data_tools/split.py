"""Train/valid/test splits that respect homology, built and checked with the real MMseqs2."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.records import DataError

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class SplitOptions:
    mode: str = "mmseqs"                # mmseqs | lists | source
    min_seq_id: float = 0.3
    coverage: float = 0.5
    fractions: Tuple[float, float, float] = (0.9, 0.05, 0.05)   # train, valid, test
    seed: int = 0
    threads: int = 2
    lists: Optional[Dict[str, str]] = None   # split -> file of accessions (mode=lists)
    max_fix_rounds: int = 5


def mmseqs_binary() -> str:
    exe = shutil.which("mmseqs")
    if not exe:
        raise DataError("mmseqs", "MMseqs2 is not installed", kind="usage",
                        fix="run launch/setup.sh (installs Debian's mmseqs2), or `apt-get install mmseqs2`")
    return exe


def _run(args: List[str], tmp: str) -> None:
    proc = subprocess.run(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")


def write_fasta(path: str, items: Iterable[Tuple[str, str]]) -> int:
    n = 0
    with open(path, "w") as f:
        for name, seq in items:
            f.write(f">{name}\n{seq}\n")
            n += 1
    return n


def cluster(fasta: str, workdir: str, opts: SplitOptions, extra: Sequence[str] = ()) -> Dict[str, str]:
    """member id -> representative id, from `mmseqs easy-cluster` (extra: more of its options)."""
    out = {}
    for mem, rep in _cluster_pairs(fasta, workdir, opts, extra):
        out[mem] = rep
    return out


def cluster_indices(fasta: str, workdir: str, opts: SplitOptions, n: int) -> np.ndarray:
    """For a FASTA of records named r0 .. r{n-1}: each record's representative's index (int64 [n]), without a
    dictionary of names (UniRef50 has tens of millions of records)."""
    rep = np.full(n, -1, dtype=np.int64)
    for mem, r in _cluster_pairs(fasta, workdir, opts, ()):
        rep[int(mem[1:])] = int(r[1:])
    if (rep < 0).any():
        raise RuntimeError(f"mmseqs easy-cluster left {int((rep < 0).sum())} of {n} records unclustered")
    return rep


def _cluster_pairs(fasta: str, workdir: str, opts: SplitOptions, extra: Sequence[str]):
    prefix = os.path.join(workdir, "clu")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        _run([mmseqs_binary(), "easy-cluster", fasta, prefix, tmp, "--min-seq-id", str(opts.min_seq_id),
              "-c", str(opts.coverage), "--cov-mode", "0", "--threads", str(opts.threads), "-v", "1", *extra], tmp)
    with open(prefix + "_cluster.tsv") as f:
        for line in f:
            rep, mem = line.rstrip("\n").split("\t")
            yield mem, rep


def search(query_fa: str, target_fa: str, workdir: str, opts: SplitOptions) -> List[Tuple[str, str, float]]:
    """(query, target, identity) for every hit covering >= opts.coverage of both sequences, any identity."""
    out = os.path.join(workdir, "hits.m8")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        _run([mmseqs_binary(), "easy-search", query_fa, target_fa, out, tmp, "-c", str(opts.coverage),
              "--cov-mode", "0", "--threads", str(opts.threads), "-v", "1",
              "--format-output", "query,target,fident"], tmp)
    hits = []
    with open(out) as f:
        for line in f:
            q, t, ident = line.split("\t")
            hits.append((q, t, float(ident)))
    return hits


def _rank(name: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()


def assign_clusters(rep: np.ndarray, opts: SplitOptions) -> np.ndarray:
    """Whole clusters to splits, in a seeded order (each cluster ranked by its representative's name, r<index>),
    each to the split furthest below its target share. rep: cluster_indices' array; returns a split code per
    record (an index into SPLITS)."""
    reps, sizes = np.unique(rep, return_counts=True)
    target = [f * len(rep) for f in opts.fractions]
    have = [0.0, 0.0, 0.0]
    code_of = np.zeros(len(reps), dtype=np.int8)
    for j in sorted(range(len(reps)), key=lambda j: _rank(f"r{reps[j]}", opts.seed)):
        k = max(range(len(SPLITS)), key=lambda k: (target[k] - have[k], -k))
        code_of[j] = k
        have[k] += int(sizes[j])
    return code_of[np.searchsorted(reps, rep)]


def homology_check(sequences: Callable[[], Iterable[Tuple[int, str]]], codes: np.ndarray, workdir: str,
                   opts: SplitOptions, fix: bool) -> dict:
    """Search valid+test against train; with fix, move every sequence with a train hit >= min_seq_id into train
    and search again until none is left. sequences(): (index, sequence) of every record, streamed; codes: each
    record's split (an index into SPLITS; negative: in none), changed in place when fixing. Returns the report."""
    moved = Counter()
    for round_ in range(opts.max_fix_rounds + 1):
        n_train, n_held = int((codes == 0).sum()), int((codes > 0).sum())
        if not n_train or not n_held:
            return {"searched": n_held, "violations": {}, "moved_to_train": dict(moved), "rounds": round_,
                    "max_identity": {}, "min_seq_id": opts.min_seq_id, "coverage": opts.coverage}
        q, t = os.path.join(workdir, "held.fa"), os.path.join(workdir, "train.fa")
        with open(q, "w") as fq, open(t, "w") as ft:
            for i, seq in sequences():
                if codes[i] >= 0:
                    (ft if codes[i] == 0 else fq).write(f">r{i}\n{seq}\n")
        best: Dict[int, float] = {}
        for qq, _, ident in search(q, t, workdir, opts):
            i = int(qq[1:])
            best[i] = max(best.get(i, 0.0), ident)
        bad = sorted(i for i, v in best.items() if v >= opts.min_seq_id)
        if not bad or not fix:
            per_split = Counter(SPLITS[codes[i]] for i in bad)
            max_id = {s: max((v for i, v in best.items() if codes[i] == k), default=0.0)
                      for k, s in enumerate(SPLITS) if k}
            return {"searched": n_held, "violations": dict(per_split), "moved_to_train": dict(moved),
                    "rounds": round_, "max_identity": max_id, "min_seq_id": opts.min_seq_id,
                    "coverage": opts.coverage}
        for i in bad:
            moved[SPLITS[codes[i]]] += 1
            codes[i] = 0
    raise RuntimeError(f"homology fix-up did not converge in {opts.max_fix_rounds} rounds")


def read_accession_list(path: str) -> List[str]:
    """One accession per line, or a CSV/TSV with an accession column (Prot2Text's train/valid/test CSVs)."""
    from data_tools.readers.rows import iter_table
    if path.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        cols, rows = iter_table(path, "\t" if ".tsv" in path else ",", required=("accession",))
        return [row[cols["accession"]].strip() for _, row in rows]
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def read_lists(lists: Dict[str, str]) -> Dict[str, int]:
    """accession -> split code, from one accession list per split."""
    which: Dict[str, int] = {}
    for split, path in lists.items():
        if split not in SPLITS:
            raise DataError(path, f"unknown split {split!r}", kind="usage", fix=f"use {', '.join(SPLITS)}")
        for acc in read_accession_list(path):
            if which.setdefault(acc, SPLITS.index(split)) != SPLITS.index(split):
                raise DataError(path, f"accession {acc} is listed in both {SPLITS[which[acc]]} and {split}",
                                kind="usage", fix="a protein must be in one split only")
    return which
