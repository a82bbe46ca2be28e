"""What `generate-protein` reads from a generation, and `evaluate`'s scores of generated proteins (real MMseqs2)."""
import json

import pytest

from megatron_p2t.evaluation import proteins as ep
from megatron_p2t.inference.generate_protein import read_sequence, tasks, valid_protein


def test_the_sequence_is_read_from_the_output_or_continues_the_prompt_and_bad_letters_are_counted():
    r = read_sequence("[Generate by superfamily] Superfamily=<Globins>", "Seq=<MKVLAAG> trailing")
    assert (r["sequence"], r["closed"], r["invalid"]) == ("MKVLAAG", True, {}) and valid_protein(r)
    r = read_sequence("[Generate by superfamily] Superfamily=<Globins> Seq=<MKRV", "LAAG>")
    assert (r["sequence"], r["closed"]) == ("MKRVLAAG", True)               # continued from the prompt's prefix
    r = read_sequence("Seq=<", "MKV1LJaXX")                                  # cut off, never closed
    assert r["sequence"] == "MKV1LJaXX" and not r["closed"] and not valid_protein(r)
    assert r["invalid"] == {"1": 1, "J": 1, "a": 1} and r["nonstandard"] == {"X": 2}   # reported, not dropped
    r = read_sequence("[Determine superfamily] Seq=<MKV>", "Superfamily=<Globins>")
    assert r["sequence"] is None and not valid_protein(r)


def test_tasks_come_from_alpaca_json_jsonl_or_a_prompt_with_their_own_ids(tmp_path):
    rows = [{"instruction": "[Generate by superfamily]", "input": "Superfamily=<A>", "task": "generate_by_superfamily",
             "id": "a"}, {"instruction": "[Determine superfamily]", "input": "Seq=<MKV>", "output": "Superfamily=<A>",
                          "task": "determine_superfamily", "id": "b"}]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = tasks(str(tmp_path / "t.json"), None, num_samples=2)
    assert [r["id"] for r in got] == ["a#s0", "a#s1", "b#s0", "b#s1"] and got[2]["reference"] == "Superfamily=<A>"
    assert tasks(str(tmp_path / "t.jsonl"), None) == tasks(str(tmp_path / "t.json"), None)
    assert [r["id"] for r in tasks(str(tmp_path / "t.json"), None, only=["determine_superfamily"])] == ["b"]
    with pytest.raises(ValueError, match=r"no rows of task\(s\) \['translate'\]"):
        tasks(str(tmp_path / "t.json"), None, only=["translate"])
    assert tasks(None, "Seq=<", num_samples=3)[2] == {"id": "prompt#s2", "instruction": "Seq=<", "input": ""}
    (tmp_path / "dup.json").write_text(json.dumps([rows[0], rows[0]]))
    with pytest.raises(ValueError, match="row ids repeat"):
        tasks(str(tmp_path / "dup.json"), None)
    with pytest.raises(ValueError, match="either --prompt"):
        tasks(None, None)


@pytest.mark.parametrize("search", ["mmseqs", "blast"])
def test_generated_proteins_are_scored_against_the_training_set(tmp_path, monkeypatch, search):
    """Two unrelated families in training; generations that copy one family, mutate the other, name the wrong one,
    stop early or write a letter outside the alphabet; answers right, wrong and unlabelled. Either search tool
    (real MMseqs2, real blastp) finds the same closest training proteins."""
    import random

    from megatron_p2t.cli import main
    rng = random.Random(0)
    fam_a = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(60))
    fam_b = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(60))
    train = ({"A1": fam_a, "B1": fam_b}, {"A1": "Fam A", "B1": "Fam B"})
    monkeypatch.setattr(ep, "training_set", lambda manifest: train)
    mutated = fam_b[:30] + "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(6)) + fam_b[36:]
    gen = [dict(id="g1", prompt="[Generate by superfamily] Superfamily=<Fam A>", requested="Fam A",
                **read_sequence("", f"Seq=<{fam_a}>")),
           dict(id="g2", prompt="[Generate by superfamily] Superfamily=<Fam B>", requested="Fam B",
                **read_sequence("", f"Seq=<{mutated}>")),
           dict(id="g3", prompt="[Generate by superfamily] Superfamily=<Fam A>", requested="Fam A",
                **read_sequence("", f"Seq=<{fam_b}>")),                       # the wrong family: a miss
           dict(id="g4", prompt="[Generate by superfamily] Superfamily=<Fam B>", requested="Fam B",
                **read_sequence("", "Seq=<DEK")),                              # never closed: invalid, a miss
           dict(id="g5", prompt="Seq=<", requested=None, **read_sequence("", "Seq=<MKV1>"))]
    ans = [{"id": f"d{i}", "prompt": "[Determine superfamily] Seq=<MKV>", "reference": "Superfamily=<Fam A>",
            "label": lab} for i, lab in enumerate(["Fam A", "Fam B", None, "Fam A"])]
    for r in gen + ans:
        r.setdefault("output", "...")          # generate-protein's raw text (what was read from it is beside it)
        r["valid"] = valid_protein(r)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen + ans))
    assert ep.is_protein_file(str(tmp_path / "p.jsonl"))
    assert main(["evaluate", str(tmp_path / "p.jsonl"), "--baseline-manifest", "unused", "--search", search,
                 "--threads", "1", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "scores.json").read_text())["systems"]["p"]
    g, u = rep["generation"], rep["understanding"]
    assert g["n"] == 5 and g["valid_rate"] == 3 / 5 and g["invalid_letters"] == {"1": 1} and g["closed"] == 4
    assert g["family_match"] == {"n": 4, "rate": 0.5, "right": 2}
    nov = g["novelty"]
    assert nov["search"] == search
    assert nov["identities"][0] == nov["identities"][2] == 1.0 and 0.8 < nov["identities"][1] < 1.0
    assert nov["near_copies_ge_0.9"] == sum(x >= 0.9 for x in nov["identities"]) and nov["no_hit"] == 0
    assert g["exact_duplicates"] == 0 and 0 < g["composition_js_bits"] < 0.2 and g["lengths"]["n"] == 3
    assert u == {"n": 4, "accuracy": 0.5, "right": 2, "unlabelled_answers": 1}
    assert ep.js_divergence(ep.composition(["AAAA"]), ep.composition(["CCCC"])) == pytest.approx(1.0)
    table = (tmp_path / "rep" / "scores.md").read_text()
    assert (tmp_path / "rep" / "identity_hist.png").exists() and "| p | 5 | 60.0% |" in table
    assert f"identity to train ({'blastp' if search == 'blast' else 'MMseqs2'}, mean)" in table


def test_search_is_refused_for_descriptions(tmp_path, capsys):
    from megatron_p2t.cli import main
    (tmp_path / "d.jsonl").write_text(json.dumps({"accession": "P1", "prediction": "x", "reference": "x"}) + "\n")
    assert main(["evaluate", str(tmp_path / "d.jsonl"), "--search", "blast", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --search picks") and "--baseline" in err
