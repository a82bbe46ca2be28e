"""Scores, the MMseqs2 nearest-neighbour baseline (real mmseqs) and the report."""
import json
import random

import pytest

from megatron_p2t import evaluation


def test_scores_perfect_partial_and_exact_match_normalisation():
    refs = ["Catalyzes the transfer of a phosphate group to ATP.", "Binds DNA."]
    perfect = evaluation.scores(refs, refs)
    assert all(perfect[k] == pytest.approx(100.0) for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL",
                                                            "exact_match"))
    s = evaluation.scores(["catalyzes the transfer of a phosphate group to atp", "Hydrolyzes RNA."], refs)
    assert s["exact_match"] == 50.0 and 0 < s["rougeL"] < 100 and 0 < s["bleu2"] < 100
    with pytest.raises(ValueError):
        evaluation.scores(["a"], ["a", "b"])


def test_mmseqs_baseline_copies_the_best_hit_and_counts_misses(tmp_path):
    rng = random.Random(0)
    aa = "ACDEFGHIKLMNPQRSTVWY"
    train = [(f"T{i}", "".join(rng.choice(aa) for _ in range(150)), f"text {i}") for i in range(5)]
    mutated = "".join(c if rng.random() > 0.1 else rng.choice(aa) for c in train[3][1])
    queries = [("Q1", mutated, "text 3"), ("Q2", "".join(rng.choice(aa) for _ in range(150)), "unrelated")]
    out = tmp_path / "nn.jsonl"
    stats = evaluation.mmseqs_baseline(train, queries, str(out))
    rows = {r["accession"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert stats == {"queries": 2, "with_hit": 1}
    assert rows["Q1"]["prediction"] == "text 3" and rows["Q1"]["hit"] == "T3" and rows["Q1"]["identity"] > 0.8
    assert rows["Q2"]["prediction"] == "" and rows["Q2"]["hit"] is None


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
    from megatron_p2t.generate import questions
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
