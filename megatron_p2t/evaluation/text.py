"""`megatron-p2t evaluate`: score generated descriptions against the references, next to the nearest-neighbour
baselines (the training set's description of the best MMseqs2 or BLAST hit).

Metrics: corpus BLEU-2 / BLEU-4 (sacrebleu, 13a tokenisation), ROUGE-1/2/L F1 (rouge-score, stemmed), exact
match (lowercased, punctuation and extra spaces removed), and BERTScore F1 when a local scoring model directory
is given (greedy cosine matching of contextual token embeddings, as Zhang et al.). Per-length-bin scores go to a
plot. Every system is scored by the same code on the same accessions; an empty prediction (no hit) counts
as a miss, never as a skipped sample. QA answers (Protein2Text-style conversations, one row per question) are
scored apart by the same metrics, per templated question too, with yes/no accuracy where the reference is yes/no.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_p2t.data import shards

_PUNCT = re.compile(r"[^\w\s]")
LENGTH_BINS = (0, 100, 200, 300, 500, 800, 10 ** 9)


def read_predictions(path: str) -> Dict[str, dict]:
    """accession -> {prediction, reference, length, ...} from a generate/baseline JSONL."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e}); was the file cut short? re-run generate to resume")
            if "accession" not in row or "prediction" not in row:
                raise ValueError(f"{path}:{n}: rows need 'accession' and 'prediction' (generate's output)")
            out[row["accession"]] = row
    return out


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def scores(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = {}
    for n in (2, 4):
        bleu = sacrebleu.metrics.BLEU(max_ngram_order=n, effective_order=False)
        out[f"bleu{n}"] = bleu.corpus_score(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for k, v in scorer.score(r, p).items():
            totals[k] += v.fmeasure
    out.update({k: 100.0 * v / len(predictions) for k, v in totals.items()})
    out["exact_match"] = 100.0 * sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) \
        / len(predictions)
    return out


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], model_dir: str, batch: int = 16) -> float:
    """Mean BERTScore F1 (no idf weighting, no baseline rescaling) with a local encoder directory."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    def embed(texts):
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=512)
        with torch.no_grad():
            h = F.normalize(model(**enc).last_hidden_state, dim=-1)
        special = torch.tensor([[t in tok.all_special_ids for t in row] for row in enc["input_ids"].tolist()])
        return h, enc["attention_mask"].bool() & ~special

    f1s = []
    for i in range(0, len(predictions), batch):
        hp, mp = embed(predictions[i:i + batch])
        hr, mr = embed(references[i:i + batch])
        sim = hp @ hr.transpose(1, 2)                                           # [b, lp, lr]
        sim = sim.masked_fill(~mr[:, None, :], -2).masked_fill(~mp[:, :, None], -2)
        prec = (sim.max(2).values * mp).sum(1) / mp.sum(1).clamp(min=1)
        rec = (sim.max(1).values * mr).sum(1) / mr.sum(1).clamp(min=1)
        f = 2 * prec * rec / (prec + rec).clamp(min=1e-9)
        f1s += [float(x) if bool(mp[j].any()) else 0.0 for j, x in enumerate(f)]
    return 100.0 * sum(f1s) / len(f1s)


def _best_hits(queries: Sequence[tuple], targets: Sequence[tuple], commands: List[List[str]], tool: str,
               percent: bool = False) -> Dict[str, tuple]:
    """Runs `commands` (each with the tool's executable first) in a scratch directory holding query.fasta and
    train.fasta, and reads hits.tsv (query, target, identity, bit score): query id -> (target id, identity as a
    fraction, bit score) of its highest-scoring hit. The FASTA names are row numbers (q0.., t0..), because both
    tools rewrite some names as they read them (`sp|P12345|X` comes back as `P12345`)."""
    from data_tools.split import write_fasta
    tmp = tempfile.mkdtemp(prefix=f"p2t_{tool}_")
    best: Dict[str, tuple] = {}
    try:
        write_fasta(os.path.join(tmp, "train.fasta"), ((f"t{i}", s) for i, (_, s) in enumerate(targets)))
        write_fasta(os.path.join(tmp, "query.fasta"), ((f"q{i}", s) for i, (_, s) in enumerate(queries)))
        for args in commands:
            proc = subprocess.run(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode:
                raise RuntimeError(f"{os.path.basename(args[0])} {args[1]} failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}")
        with open(os.path.join(tmp, "hits.tsv")) as f:
            for line in f:
                q, t, ident, bits = line.rstrip("\n").split("\t")
                q, t = queries[int(q[1:])][0], targets[int(t[1:])][0]
                if q not in best or float(bits) > best[q][2]:
                    best[q] = (t, round(float(ident) / (100.0 if percent else 1.0), 5), float(bits))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return best


def mmseqs_best_hits(queries: Sequence[tuple], targets: Sequence[tuple], threads: int = 2,
                     sensitivity: float = 7.5, mask: bool = True) -> Dict[str, tuple]:
    """query id -> (target id, identity, bit score) of its best MMseqs2 hit (highest bit score) among targets;
    queries without a hit (at MMseqs2's default E-value, 1e-3) are absent. queries / targets: (id, sequence).
    mask=False turns off MMseqs2's low-complexity masking (generated proteins may be all low-complexity, which
    would leave it no k-mer)."""
    from data_tools.split import mmseqs_binary
    return _best_hits(queries, targets, [[mmseqs_binary(), "easy-search", "query.fasta", "train.fasta", "hits.tsv",
                                          "work", "--threads", str(threads), "-s", str(sensitivity),
                                          *([] if mask else ["--mask", "0"]),
                                          "--format-output", "query,target,fident,bits"]], "mmseqs")


def blast_binaries() -> tuple:
    exes = tuple(shutil.which(n) for n in ("makeblastdb", "blastp"))
    if not all(exes):
        from data_tools.records import DataError
        raise DataError("blastp", "NCBI BLAST+ is not installed (makeblastdb, blastp)", kind="usage",
                        fix="run launch/setup.sh (installs Debian's ncbi-blast+), or `apt-get install ncbi-blast+`")
    return exes


def blast_best_hits(queries: Sequence[tuple], targets: Sequence[tuple], threads: int = 2,
                    evalue: float = 1e-3) -> Dict[str, tuple]:
    """query id -> (target id, identity, bit score) of its best blastp hit (highest bit score over every HSP of
    the first 10 targets) among targets; queries without a hit at `evalue` (MMseqs2's default, so both baselines
    call the same significance a hit) are absent."""
    makeblastdb, blastp = blast_binaries()
    return _best_hits(queries, targets, [
        [makeblastdb, "-in", "train.fasta", "-dbtype", "prot", "-out", "train"],
        [blastp, "-query", "query.fasta", "-db", "train", "-out", "hits.tsv", "-evalue", str(evalue),
         "-max_target_seqs", "10", "-num_threads", str(threads), "-outfmt", "6 qseqid sseqid pident bitscore"]],
        "blast", percent=True)


BASELINES = {"mmseqs": mmseqs_best_hits, "blast": blast_best_hits}


def nearest_neighbour(train: Iterable[tuple], queries: Iterable[tuple], out_path: str, tool: str = "mmseqs",
                      threads: int = 2) -> dict:
    """The nearest-neighbour baseline: each query gets the description of its best hit in the training set
    (highest bit score) by `tool` (MMseqs2 or BLAST, `BASELINES`), or "" when nothing is found. train:
    (accession, sequence, text); queries: (accession, sequence, reference). Writes JSONL like `generate`, with
    the hit and its identity."""
    train, queries = list(train), list(queries)
    text_of = {a: t for a, _, t in train}
    best = BASELINES[tool]([(a, s) for a, s, _ in queries], [(a, s) for a, s, _ in train], threads)
    with open(out_path, "w") as f:
        for a, s, ref in queries:
            hit = best.get(a)
            f.write(json.dumps({"accession": a, "prediction": text_of[hit[0]] if hit else "", "reference": ref,
                                "length": len(s), "hit": hit[0] if hit else None,
                                "identity": hit[1] if hit else None}) + "\n")
    return {"queries": len(queries), "with_hit": len(best)}


def yes_no(text: str) -> Optional[str]:
    """"yes" / "no" when the answer starts with that word, else None."""
    words = normalize(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def evaluate(systems: Dict[str, str], out_dir: str, bertscore_model: Optional[str] = None) -> dict:
    """systems: name -> predictions JSONL. Function descriptions: every system on the accessions all of them
    cover. QA answers (rows with a `question`, one per question): the systems that have them, on the questions
    all of those cover, by the same metrics, plus yes/no accuracy where the reference answer is yes or no."""
    os.makedirs(out_dir, exist_ok=True)
    preds = {name: read_predictions(p) for name, p in systems.items()}
    func = {n: {a: r for a, r in p.items() if "question" not in r} for n, p in preds.items()}
    qa = {n: {a: r for a, r in p.items() if "question" in r} for n, p in preds.items()}
    func = {n: p for n, p in func.items() if p}
    qa = {n: p for n, p in qa.items() if p}
    report: dict = {"files": {k: os.path.abspath(v) for k, v in systems.items()}}
    if func:
        report.update(_descriptions(func, bertscore_model))
    if qa:
        report["qa"] = _answers(qa, bertscore_model)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "scores.md"), "w") as f:
        f.write(markdown(report))
    if func:
        _plot(report["by_length"], os.path.join(out_dir, "by_length.png"))
    return report


def _common(preds: Dict[str, Dict[str, dict]], what: str):
    common = sorted(set.intersection(*(set(p) for p in preds.values())))
    if not common:
        raise ValueError(f"no {what} is present in every file of {sorted(preds)}")
    first = preds[next(iter(preds))]
    if any("reference" not in first[a] for a in common):
        raise ValueError("predictions carry no 'reference' text; generate from shards (which hold the answer)")
    return common, first


def _score(hyp, refs, bertscore_model) -> dict:
    out = scores(hyp, refs)
    if bertscore_model:
        out["bertscore_f1"] = bertscore_f1(hyp, refs, bertscore_model)
    out["empty"] = sum(not h for h in hyp)
    return out


def _descriptions(preds: Dict[str, Dict[str, dict]], bertscore_model) -> dict:
    common, first = _common(preds, "accession")
    refs = [first[a]["reference"] for a in common]
    lengths = [int(first[a].get("length", 0)) for a in common]
    table, by_bin = {}, {}
    for name, p in preds.items():
        hyp = [p[a]["prediction"] for a in common]
        table[name] = _score(hyp, refs, bertscore_model)
        by_bin[name] = {}
        for lo, hi in zip(LENGTH_BINS[:-1], LENGTH_BINS[1:]):
            idx = [i for i, n in enumerate(lengths) if lo <= n < hi]
            if idx:
                s = scores([hyp[i] for i in idx], [refs[i] for i in idx])
                by_bin[name][f"{lo}-{hi if hi < 10 ** 9 else ''}"] = {"n": len(idx), "rougeL": s["rougeL"],
                                                                      "bleu4": s["bleu4"]}
    return {"n": len(common), "systems": table, "by_length": by_bin}


def _answers(preds: Dict[str, Dict[str, dict]], bertscore_model, top_questions: int = 20) -> dict:
    common, first = _common(preds, "question")
    refs = [first[a]["reference"] for a in common]
    asked = [first[a]["question"] for a in common]
    kinds = Counter(normalize(q) for q in asked)
    frequent = [q for q, n in kinds.most_common(top_questions) if n > 1]   # templated questions
    yn = [i for i, r in enumerate(refs) if yes_no(r)]
    table, by_question = {}, {}
    for name, p in preds.items():
        hyp = [p[a]["prediction"] for a in common]
        table[name] = _score(hyp, refs, bertscore_model)
        table[name]["yes_no_n"] = len(yn)
        table[name]["yes_no_accuracy"] = (100.0 * sum(yes_no(hyp[i]) == yes_no(refs[i]) for i in yn) / len(yn)
                                          if yn else None)
        by_question[name] = {}
        for q in frequent:
            idx = [i for i, a in enumerate(asked) if normalize(a) == q]
            s = scores([hyp[i] for i in idx], [refs[i] for i in idx])
            by_question[name][q] = {"n": len(idx), "rougeL": s["rougeL"], "bleu4": s["bleu4"],
                                    "exact_match": s["exact_match"]}
    return {"n": len(common), "systems": table, "by_question": by_question}


def markdown(report: dict) -> str:
    parts = []
    if "systems" in report:
        parts.append([f"{report['n']} proteins scored by every system.", "", *_table(report["systems"])])
    if "qa" in report:
        qa = report["qa"]
        parts.append([f"{qa['n']} questions (QA) scored by every system that answered them.", "",
                      *_table(qa["systems"], yes_no_col=True)])
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def _table(systems: dict, yes_no_col: bool = False) -> List[str]:
    cols = ["bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "exact_match"]
    if any("bertscore_f1" in s for s in systems.values()):
        cols.append("bertscore_f1")
    extra = " yes/no acc (n) |" if yes_no_col else ""
    lines = ["| system | " + " | ".join(cols) + " | empty |" + extra, "|---" * (len(cols) + 2 + yes_no_col) + "|"]
    for name, s in systems.items():
        row = f"| {name} | " + " | ".join(f"{s[c]:.2f}" for c in cols) + f" | {s['empty']} |"
        if yes_no_col:
            acc = s["yes_no_accuracy"]
            row += f" {'-' if acc is None else f'{acc:.1f}'} ({s['yes_no_n']}) |"
        lines.append(row)
    return lines


def _plot(by_bin: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, bins in by_bin.items():
        ax.plot(list(bins), [b["rougeL"] for b in bins.values()], marker="o", label=name)
    ax.set_xlabel("protein length (residues)")
    ax.set_ylabel("ROUGE-L F1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_records(manifest: str, split: str) -> List[tuple]:
    """(sample key, sequence, text, meta) of every sample of a split of a shards manifest, in shard order. The key
    is the accession, plus the task for instruction data (one protein may carry several questions)."""
    return [(s["__key__"], s["seq"].decode(), s["txt"].decode(), json.loads(s["json"]))
            for s in shards.split_samples(manifest, split)]
