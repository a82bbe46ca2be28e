"""`megatron-p2t evaluate` for `generate-protein` rows: proteins a decoder-only model wrote, and its answers.

Generation rows (the prompt does not hold a whole Seq=<...>):
- validity: the share of rows with a whole (closed) sequence of the 20 standard amino acids; letters outside the
  alphabet and non-standard ones are counted by letter;
- length distribution of the valid ones (beside the training set's);
- amino-acid composition: Jensen-Shannon divergence (bits) from the training set's, and each residue's share;
- novelty: each valid protein's identity to its closest training protein (best bit score of MMseqs2 easy-search,
  or of NCBI blastp with --search blast: slower, more sensitive to remote hits; no hit counts as novel), with a
  histogram plot; the share of near-copies (identity >= 0.9);
- diversity: MMseqs2 clusters among the valid generations (50% identity, 80% coverage) per protein, and exact
  duplicates (both MMseqs2 steps without low-complexity masking, which would find no k-mer in a repeat);
- by family: where the prompt asked for one (Superfamily=<...>), the share whose closest training protein has that
  family (an invalid or hitless generation counts as a miss, never as skipped).
Understanding rows (`[Determine superfamily] Seq=<...>`): accuracy of the Superfamily=<...> answer against the
reference's; an answer without a label counts as wrong.
The training set is a built manifest's train split (--baseline-manifest): its sequences, and the family label of
every accession where its rows carry one.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Dict, List, Optional

import numpy as np

from megatron_p2t.evaluation.text import blast_best_hits, mmseqs_best_hits, split_records
from megatron_p2t.inference.generate_protein import STANDARD, label_in, valid_protein

_WHOLE_SEQ = re.compile(r"Seq=<[^>]*>")


def read_rows(path: str) -> List[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e}); re-run generate-protein to resume") from None
    return rows


def is_protein_file(path: str) -> bool:
    """generate-protein's rows (id + output), not generate's (accession + prediction)."""
    with open(path) as f:
        first = next((l for l in f if l.strip()), "{}")
    row = json.loads(first)
    return "output" in row and "prediction" not in row


def training_set(manifest: str):
    """(sequences by accession, family label by accession) of a manifest's train split."""
    seqs, labels = {}, {}
    for key, seq, text, meta in split_records(manifest, "train"):
        acc = meta.get("accession", key)
        seqs.setdefault(acc, seq)
        lab = label_in(text) or label_in(meta.get("input", ""))
        if lab:
            labels.setdefault(acc, lab)
    return seqs, labels


def composition(seqs) -> np.ndarray:
    c = Counter()
    for s in seqs:
        c.update(s)
    v = np.array([c[a] for a in sorted(STANDARD)], dtype=np.float64)
    return v / max(v.sum(), 1.0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0: same composition, 1: disjoint)."""
    m = (p + q) / 2
    kl = lambda a, b: float(sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0))
    return (kl(p, m) + kl(q, m)) / 2


def _lengths(xs) -> dict:
    if not len(xs):
        return {"n": 0}
    a = np.asarray(xs)
    return {"n": len(a), "mean": float(a.mean()), "median": float(np.median(a)), "p5": float(np.percentile(a, 5)),
            "p95": float(np.percentile(a, 95)), "min": int(a.min()), "max": int(a.max())}


def clusters(seqs: Dict[str, str], min_seq_id: float = 0.5, coverage: float = 0.8) -> int:
    import tempfile
    from data_tools.split import SplitOptions, cluster, write_fasta
    if len(seqs) < 2:
        return len(seqs)
    with tempfile.TemporaryDirectory(prefix="p2t_div_") as tmp:
        write_fasta(os.path.join(tmp, "gen.fasta"), seqs.items())
        # no low-complexity masking: a model's repeats would leave MMseqs2 no k-mer to start from
        members = cluster(os.path.join(tmp, "gen.fasta"), tmp, SplitOptions(min_seq_id=min_seq_id,
                                                                             coverage=coverage), ["--mask", "0"])
    return len(set(members.values()))


def closest_training_proteins(queries, targets, search: str = "mmseqs", threads: int = 2) -> Dict[str, tuple]:
    """id -> (training accession, identity, bit score) of each generated protein's best hit; hitless ones are
    absent. MMseqs2 runs without low-complexity masking, which would leave it no k-mer in a model's repeats."""
    if search == "blast":
        return blast_best_hits(queries, targets, threads)
    if search == "mmseqs":
        return mmseqs_best_hits(queries, targets, threads, mask=False)
    raise ValueError(f"search {search!r}: mmseqs or blast")


def score_generations(rows: List[dict], train: Optional[tuple], search: str = "mmseqs", threads: int = 2) -> dict:
    gen = [r for r in rows if not _WHOLE_SEQ.search(r.get("prompt", ""))]
    if not gen:
        return {}
    valid = {r["id"]: r["sequence"] for r in gen if valid_protein(r)}
    out = {"n": len(gen), "valid_rate": len(valid) / len(gen),
           "with_sequence": sum(r.get("sequence") is not None for r in gen),
           "closed": sum(bool(r.get("closed")) for r in gen),
           "invalid_letters": dict(sum((Counter(r.get("invalid") or {}) for r in gen), Counter())),
           "nonstandard_letters": dict(sum((Counter(r.get("nonstandard") or {}) for r in gen), Counter())),
           "lengths": _lengths([len(s) for s in valid.values()]),
           "exact_duplicates": len(valid) - len(set(valid.values()))}
    if len(valid) >= 2:
        out["diversity_clusters_per_protein"] = clusters(valid) / len(valid)
    if train is None:
        return out
    train_seqs, train_labels = train
    comp_gen, comp_train = composition(valid.values()), composition(train_seqs.values())
    out["composition_js_bits"] = js_divergence(comp_gen, comp_train) if valid else None
    out["composition"] = {a: {"generated": float(g), "train": float(t)}
                          for a, g, t in zip(sorted(STANDARD), comp_gen, comp_train)}
    out["train_lengths"] = _lengths([len(s) for s in train_seqs.values()])
    hits = closest_training_proteins(list(valid.items()), list(train_seqs.items()), search, threads) if valid else {}
    ident = [hits[i][1] if i in hits else 0.0 for i in valid]
    out["novelty"] = {"search": search, "max_identity_mean": float(np.mean(ident)) if ident else None,
                      "max_identity_median": float(np.median(ident)) if ident else None,
                      "near_copies_ge_0.9": sum(x >= 0.9 for x in ident), "no_hit": len(valid) - len(hits),
                      "identities": ident}
    asked = [r for r in gen if r.get("requested")]
    if asked:
        right = [hits.get(r["id"]) is not None and train_labels.get(hits[r["id"]][0]) == r["requested"]
                 and r["id"] in valid for r in asked]
        out["family_match"] = {"n": len(asked), "rate": sum(right) / len(asked), "right": sum(right)}
    return out


def score_answers(rows: List[dict]) -> dict:
    ans = [r for r in rows if _WHOLE_SEQ.search(r.get("prompt", "")) and label_in(r.get("reference"))]
    if not ans:
        return {}
    right = sum(r.get("label") is not None and r["label"] == label_in(r["reference"]) for r in ans)
    return {"n": len(ans), "accuracy": right / len(ans), "right": right,
            "unlabelled_answers": sum(r.get("label") is None for r in ans)}


def evaluate(systems: Dict[str, str], out_dir: str, train_manifest: Optional[str] = None, search: str = "mmseqs",
             threads: int = 2) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    train = training_set(train_manifest) if train_manifest else None
    report = {"files": {k: os.path.abspath(v) for k, v in systems.items()}, "search": search, "systems": {}}
    for name, path in systems.items():
        rows = read_rows(path)
        report["systems"][name] = {"generation": score_generations(rows, train, search, threads),
                                   "understanding": score_answers(rows)}
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "scores.md"), "w") as f:
        f.write(markdown(report))
    if train is not None:
        _plot({n: s["generation"].get("novelty", {}).get("identities", []) for n, s in report["systems"].items()},
              os.path.join(out_dir, "identity_hist.png"), search)
    return report


def markdown(report: dict) -> str:
    tool = "blastp" if report.get("search") == "blast" else "MMseqs2"
    lines = ["| system | generated | valid | length mean (train) | composition JS (bits) | identity to train "
             f"({tool}, mean) | near copies | clusters / protein | family match | understanding acc |",
             "|---" * 10 + "|"]
    fmt = lambda x, p=".3f": "-" if x is None else format(x, p)
    for name, s in report["systems"].items():
        g, u = s["generation"], s["understanding"]
        nov = g.get("novelty", {})
        lines.append(f"| {name} | {g.get('n', 0)} | {fmt(g.get('valid_rate'), '.1%')} | "
                     f"{fmt(g.get('lengths', {}).get('mean'), '.1f')} ({fmt(g.get('train_lengths', {}).get('mean'), '.1f')}) | "
                     f"{fmt(g.get('composition_js_bits'))} | {fmt(nov.get('max_identity_mean'))} | "
                     f"{nov.get('near_copies_ge_0.9', '-')} | {fmt(g.get('diversity_clusters_per_protein'))} | "
                     f"{fmt(g.get('family_match', {}).get('rate'), '.1%')} | {fmt(u.get('accuracy'), '.1%')} |")
    return "\n".join(lines) + "\n"


def _plot(identities: Dict[str, list], path: str, search: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, xs in identities.items():
        ax.hist(xs, bins=np.linspace(0, 1, 21), alpha=0.6, label=f"{name} ({len(xs)})")
    ax.set_xlabel(f"identity to the closest training protein ({'blastp' if search == 'blast' else 'MMseqs2'}; "
                  f"no hit = 0)")
    ax.set_ylabel("generated proteins")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
