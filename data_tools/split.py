"""Train/valid/test splits that respect homology, built and checked with the real MMseqs2."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

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
    prefix = os.path.join(workdir, "clu")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        _run([mmseqs_binary(), "easy-cluster", fasta, prefix, tmp, "--min-seq-id", str(opts.min_seq_id),
              "-c", str(opts.coverage), "--cov-mode", "0", "--threads", str(opts.threads), "-v", "1", *extra], tmp)
    members = {}
    with open(prefix + "_cluster.tsv") as f:
        for line in f:
            rep, mem = line.rstrip("\n").split("\t")
            members[mem] = rep
    return members


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


def assign_clusters(members: Dict[str, str], opts: SplitOptions) -> Dict[str, str]:
    """Whole clusters to splits, in a seeded order, each to the split furthest below its target share."""
    by_rep = defaultdict(list)
    for mem, rep in members.items():
        by_rep[rep].append(mem)
    total = len(members)
    target = dict(zip(SPLITS, (f * total for f in opts.fractions)))
    have = Counter()
    out = {}
    for rep in sorted(by_rep, key=lambda r: _rank(r, opts.seed)):
        split = max(SPLITS, key=lambda s: (target[s] - have[s], -SPLITS.index(s)))
        for m in by_rep[rep]:
            out[m] = split
        have[split] += len(by_rep[rep])
    return out


def homology_check(seqs: Dict[str, str], assignment: Dict[str, str], workdir: str, opts: SplitOptions,
                   fix: bool) -> dict:
    """Search valid+test against train; with fix, move every sequence with a train hit >= min_seq_id into train
    and search again until none is left. Returns the report (and mutates assignment when fixing)."""
    moved = Counter()
    for round_ in range(opts.max_fix_rounds + 1):
        train = [k for k, s in assignment.items() if s == "train"]
        held = [k for k, s in assignment.items() if s != "train"]
        if not train or not held:
            return {"searched": len(held), "violations": {}, "moved_to_train": dict(moved), "rounds": round_,
                    "max_identity": {}, "min_seq_id": opts.min_seq_id, "coverage": opts.coverage}
        q, t = os.path.join(workdir, "held.fa"), os.path.join(workdir, "train.fa")
        write_fasta(q, ((k, seqs[k]) for k in held))
        write_fasta(t, ((k, seqs[k]) for k in train))
        best: Dict[str, float] = {}
        for qq, _, ident in search(q, t, workdir, opts):
            best[qq] = max(best.get(qq, 0.0), ident)
        bad = {k for k, v in best.items() if v >= opts.min_seq_id}
        if not bad or not fix:
            per_split = Counter(assignment[k] for k in bad)
            max_id = {s: max((best[k] for k in held if assignment[k] == s and k in best), default=0.0)
                      for s in SPLITS[1:]}
            return {"searched": len(held), "violations": dict(per_split), "moved_to_train": dict(moved),
                    "rounds": round_, "max_identity": max_id, "min_seq_id": opts.min_seq_id,
                    "coverage": opts.coverage}
        for k in bad:
            moved[assignment[k]] += 1
            assignment[k] = "train"
    raise RuntimeError(f"homology fix-up did not converge in {opts.max_fix_rounds} rounds")


def read_accession_list(path: str) -> List[str]:
    """One accession per line, or a CSV/TSV with an accession column (Prot2Text's train/valid/test CSVs)."""
    from data_tools.readers.rows import iter_table
    if path.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        cols, rows = iter_table(path, "\t" if ".tsv" in path else ",", required=("accession",))
        return [row[cols["accession"]].strip() for _, row in rows]
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def assign_from_lists(accessions: Sequence[str], lists: Dict[str, str]) -> Dict[str, str]:
    which = {}
    for split, path in lists.items():
        if split not in SPLITS:
            raise DataError(path, f"unknown split {split!r}", kind="usage", fix=f"use {', '.join(SPLITS)}")
        for acc in read_accession_list(path):
            if which.setdefault(acc, split) != split:
                raise DataError(path, f"accession {acc} is listed in both {which[acc]} and {split}",
                                kind="usage", fix="a protein must be in one split only")
    return {a: which[a] for a in accessions if a in which}
