"""Scores, the nearest-neighbour baselines (real MMseqs2 and BLAST) and the report."""
import json
import random

import pytest

from megatron_p2t.evaluation import text as evaluation


def test_scores_perfect_partial_and_exact_match_normalisation():
    refs = ["Catalyzes the transfer of a phosphate group to ATP.", "Binds DNA."]
    perfect = evaluation.scores(refs, refs)
    assert all(perfect[k] == pytest.approx(100.0) for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL",
                                                            "exact_match"))
    s = evaluation.scores(["catalyzes the transfer of a phosphate group to atp", "Hydrolyzes RNA."], refs)
    assert s["exact_match"] == 50.0 and 0 < s["rougeL"] < 100 and 0 < s["bleu2"] < 100
    with pytest.raises(ValueError):
        evaluation.scores(["a"], ["a", "b"])


@pytest.mark.parametrize("tool", ["mmseqs", "blast"])
def test_nearest_neighbour_copies_the_best_hit_and_counts_misses(tmp_path, tool):
    rng = random.Random(0)
    aa = "ACDEFGHIKLMNPQRSTVWY"
    train = [(f"T{i}", "".join(rng.choice(aa) for _ in range(150)), f"text {i}") for i in range(5)]
    train[3] = ("sp|T3|ABC_HUMAN", *train[3][1:])   # a name the tools rewrite as they read it (MMseqs2: "T3")
    mutated = "".join(c if rng.random() > 0.1 else rng.choice(aa) for c in train[3][1])
    queries = [("Q1", mutated, "text 3"), ("Q2", "".join(rng.choice(aa) for _ in range(150)), "unrelated")]
    out = tmp_path / "nn.jsonl"
    stats = evaluation.nearest_neighbour(train, queries, str(out), tool)
    rows = {r["accession"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert stats == {"queries": 2, "with_hit": 1}
    assert rows["Q1"]["prediction"] == "text 3" and rows["Q1"]["hit"] == "sp|T3|ABC_HUMAN"
    assert 0.8 < rows["Q1"]["identity"] < 1.0
    assert rows["Q2"]["prediction"] == "" and rows["Q2"]["hit"] is None


def test_evaluate_runs_both_baselines_and_they_agree_on_the_real_sample(tmp_path, built_sample):
    """`evaluate --baseline mmseqs --baseline blast` on the SwissProt sample's homology-split test set: every
    protein gets a row from each tool, a hit's row carries the training description of the protein it names, and
    where both tools find a hit it is the same training protein at about the same identity (measured: MMseqs2 12
    hits, BLAST 11, the same protein for all 11, identities within 0.02)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    out, _ = built_sample
    manifest = os.path.join(out, "manifest.json")
    train = {k: t for k, _, t, _ in evaluation.split_records(manifest, "train")}
    test = evaluation.split_records(manifest, "test")
    preds = tmp_path / "ours.jsonl"
    preds.write_text("".join(json.dumps({"accession": k, "prediction": t, "reference": t, "length": len(s)}) + "\n"
                             for k, s, t, _ in test))
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "evaluate", str(preds), "--baseline-manifest",
                        manifest, "--baseline", "mmseqs", "--baseline", "blast", "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "rep" / "scores.json").read_text())
    assert rep["n"] == len(test) == 44
    assert set(rep["systems"]) == {"ours", "mmseqs_nearest_neighbour", "blast_nearest_neighbour"}
    assert rep["systems"]["ours"]["exact_match"] == 100.0
    rows = {}
    for tool in ("mmseqs", "blast"):
        got = [json.loads(l) for l in (tmp_path / "rep" / f"{tool}_nearest_neighbour.jsonl").read_text().splitlines()]
        assert sorted(g["accession"] for g in got) == sorted(k for k, *_ in test)
        for g in got:
            assert g["prediction"] == (train[g["hit"]] if g["hit"] else ""), (tool, g)
        rows[tool] = {g["accession"]: g for g in got}
    both = [k for k in rows["mmseqs"] if rows["mmseqs"][k]["hit"] and rows["blast"][k]["hit"]]
    assert len(both) >= 8
    for k in both:
        m, b = rows["mmseqs"][k], rows["blast"][k]
        assert m["hit"] == b["hit"] and abs(m["identity"] - b["identity"]) < 0.05, (m, b)
    # --baseline is for descriptions with a training set; alone it is refused in one line
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "evaluate", str(preds), "--baseline", "blast", "--out",
                        str(tmp_path / "rep2")], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--baseline-manifest" in r.stderr


def test_report_scores_every_system_on_the_same_proteins(tmp_path):
    rows = [{"accession": f"P{i}", "prediction": "Binds DNA." if i % 2 else "", "reference": "Binds DNA.",
             "length": 50 + 150 * i} for i in range(6)]
    a, b = tmp_path / "ours.jsonl", tmp_path / "other.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_text("".join(json.dumps(dict(r, prediction="Binds DNA.")) + "\n" for r in rows[:4]))
    rep = evaluation.evaluate({"ours": str(a), "other": str(b)}, str(tmp_path / "rep"))
    assert rep["n"] == 4 and rep["systems"]["other"]["exact_match"] == 100.0
    assert rep["systems"]["ours"]["exact_match"] == 50.0 and rep["systems"]["ours"]["empty"] == 2
    md = (tmp_path / "rep" / "scores.md").read_text()
    assert "| ours |" in md and "| other |" in md
    assert (tmp_path / "rep" / "by_length.png").stat().st_size > 1000
    (tmp_path / "bad.jsonl").write_text('{"accession": "P1", "prediction": "x"}\n{"accession": ')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        evaluation.read_predictions(str(tmp_path / "bad.jsonl"))


def test_bertscore_with_a_local_encoder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "binds", "dna", "rna", "hydrolyzes", "atp", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "enc")
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "enc")
    same = evaluation.bertscore_f1(["binds dna ."], ["binds dna ."], str(tmp_path / "enc"))
    other = evaluation.bertscore_f1(["hydrolyzes atp"], ["binds dna ."], str(tmp_path / "enc"))
    empty = evaluation.bertscore_f1([""], ["binds dna ."], str(tmp_path / "enc"))
    assert same == pytest.approx(100.0, abs=1e-3) and other < same and empty == 0.0


def test_qa_answers_are_scored_per_question_with_yes_no_accuracy_beside_the_descriptions(tmp_path):
    from megatron_p2t.inference.generate import questions
    conv = [{"from": "human", "value": "<protein>\nIs it an enzyme?"}, {"from": "gpt", "value": "Yes, a kinase."},
            {"from": "human", "value": "Where is it found?"}, {"from": "gpt", "value": "In the nucleus."}]
    items = questions("P9", "MKV", {"conversations": conv})
    assert [(k, ref, m["question"]) for k, _, ref, m in items] == [
        ("P9#q1", "Yes, a kinase.", "<protein>\nIs it an enzyme?"), ("P9#q2", "In the nucleus.", "Where is it found?")]
    assert items[1][3]["conversations"] == conv[:3]          # the history as the reference gives it
    rows = [{"accession": "F1", "prediction": "Binds DNA.", "reference": "Binds DNA.", "length": 80}]
    answers = {"Is it an enzyme?": ["Yes.", "No.", "Yes, it is.", "No."], "Where is it found?": ["In the nucleus."] * 4}
    guesses = {"Is it an enzyme?": ["yes", "Yes.", "Yes", "it is not"], "Where is it found?": ["In the nucleus."] * 4}
    for q in answers:
        for i, (ref, hyp) in enumerate(zip(answers[q], guesses[q])):
            rows.append({"accession": f"Q{i}#{q[:5]}", "question": q, "prediction": hyp, "reference": ref,
                         "length": 80})
    (tmp_path / "p2t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "nn.jsonl").write_text(json.dumps(rows[0]) + "\n")   # the baseline: descriptions only
    rep = evaluation.evaluate({"p2t": str(tmp_path / "p2t.jsonl"), "nn": str(tmp_path / "nn.jsonl")},
                              str(tmp_path / "rep"))
    assert rep["n"] == 1 and set(rep["systems"]) == {"p2t", "nn"}            # descriptions: both systems
    qa = rep["qa"]
    assert qa["n"] == 8 and set(qa["systems"]) == {"p2t"}                   # answers: who gave them
    s = qa["systems"]["p2t"]
    assert s["yes_no_n"] == 4 and s["yes_no_accuracy"] == 50.0             # yes/yes no/yes yes/yes no/(none)
    assert qa["by_question"]["p2t"]["where is it found"]["exact_match"] == 100.0
    assert qa["by_question"]["p2t"]["is it an enzyme"]["n"] == 4
    md = (tmp_path / "rep" / "scores.md").read_text()
    assert "8 questions (QA)" in md and "50.0 (4)" in md
