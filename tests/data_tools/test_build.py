import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_tools.build import BuildOptions, build
from data_tools.records import DataError
from data_tools.shards import iter_shard_samples, verify
from data_tools.split import SplitOptions, search, write_fasta
from tests.conftest import ROOT


def _samples(out, manifest, split):
    for s in manifest["shards"]:
        if s["split"] == split:
            yield from iter_shard_samples(os.path.join(out, s["path"]))


def test_sample_counts_per_reason(built_sample):
    out, m = built_sample
    assert m["records"]["records_read"] == 1203
    assert m["records"]["bad_input"] == {"stray_text": 1}
    assert m["records"]["dropped"] == {"unreviewed": 156, "too_long": 97, "no_function": 59,
                                       "duplicate_accession": 12, "too_short": 2}
    assert m["records"]["kept"] == 877 == 1203 - 156 - 97 - 59 - 12 - 2
    counts = m["split"]["counts"]
    assert sum(counts.values()) == 877 and counts["valid"] > 20 and counts["test"] > 20
    assert {s: v["count"] for s, v in m["splits"].items()} == counts
    assert sum(s["count"] for s in m["shards"]) == 877


def test_shard_contents_are_the_cleaned_records(built_sample):
    out, m = built_sample
    keys = set()
    for split in ("train", "valid", "test"):
        for key, s in _samples(out, m, split):
            meta = json.loads(s["json"])
            assert key == meta["accession"] and meta["length"] == len(s["seq"])
            assert 30 <= len(s["seq"]) <= 1024
            text = s["txt"].decode()
            assert text and "{ECO:" not in text and "PubMed:" not in text
            keys.add(key)
    assert len(keys) == 877


@pytest.mark.slow
def test_no_test_sequence_has_a_train_neighbour(built_sample, tmp_path):
    """The build's claim, checked again here by searching the written shards with mmseqs."""
    out, m = built_sample
    chk = m["split"]["homology_check"]
    assert chk["violations"] == {} and chk["searched"] == m["split"]["counts"]["valid"] + m["split"]["counts"]["test"]
    train = {k: s["seq"].decode() for k, s in _samples(out, m, "train")}
    held = {k: s["seq"].decode() for sp in ("valid", "test") for k, s in _samples(out, m, sp)}
    write_fasta(str(tmp_path / "t.fa"), train.items())
    write_fasta(str(tmp_path / "q.fa"), held.items())
    hits = search(str(tmp_path / "q.fa"), str(tmp_path / "t.fa"), str(tmp_path), SplitOptions())
    assert hits, "the search must find weak hits, or it checked nothing"
    assert max(h[2] for h in hits) < 0.3


def test_check_would_catch_a_leak(tmp_path, sample_records):
    """Put near-identical copies on both sides: the homology check must report and fix them."""
    import numpy as np
    from data_tools.split import homology_check
    recs = [r for r in sample_records if 30 <= len(r.sequence) <= 400][:60]
    seqs = [r.sequence for r in recs] + [r.sequence[:-3] + "WWW" for r in recs[:5]]
    codes = np.zeros(len(seqs), dtype=np.int8)           # all train ...
    codes[60:] = 2                                       # ... but the five near-copies in test
    rep = homology_check(lambda: enumerate(seqs), codes.copy(), str(tmp_path), SplitOptions(), fix=False)
    assert rep["violations"] == {"test": 5}
    fixed = codes.copy()
    rep = homology_check(lambda: enumerate(seqs), fixed, str(tmp_path), SplitOptions(), fix=True)
    assert rep["violations"] == {} and rep["moved_to_train"] == {"test": 5}
    assert (fixed == 0).all()


def _shas(manifest):
    return [(s["path"], s["sha256"], s["count"]) for s in manifest["shards"]]


@pytest.mark.slow
def test_deterministic_across_process_counts(tmp_path, sample_path, built_sample):
    m1 = build(BuildOptions(inputs=[sample_path], out=str(tmp_path / "p1"), skip_bad=True, samples_per_shard=37,
                            quiet=True, processes=1))
    assert _shas(m1) == _shas(built_sample[1])


@pytest.mark.slow
def test_kill_during_shard_writing_then_resume(tmp_path, sample_path):
    # many small shards keep the writing stage long enough to be interrupted reliably
    reference = build(BuildOptions(inputs=[sample_path], out=str(tmp_path / "ref"), skip_bad=True,
                                   samples_per_shard=5, quiet=True, processes=2))
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "data_tools", "build", sample_path, "--out", str(out), "--skip-bad",
           "--samples-per-shard", "5", "--processes", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    shard_dir = out / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard_dir.exists() and any(n.endswith(".tar") for n in os.listdir(shard_dir)):
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the kill came too late to interrupt the build"
    journal = {json.loads(l)["name"] for l in open(shard_dir / ".journal.jsonl")} if \
        (shard_dir / ".journal.jsonl").exists() else set()
    complete = sorted(n for n in os.listdir(shard_dir) if n.endswith(".tar"))
    assert len(complete) < len(reference["shards"])
    # whatever carries a final name is whole: shards are renamed into place only after fsync
    for n in complete:
        list(iter_shard_samples(str(shard_dir / n)))
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    m = json.load(open(out / "manifest.json"))
    assert _shas(m) == _shas(reference)
    assert not any(n.endswith(".tmp") for n in os.listdir(shard_dir))
    assert len(journal) <= len(complete)


def test_rerun_reuses_stages_and_refuses_other_options(tmp_path, sample_path):
    opts = BuildOptions(inputs=[sample_path], out=str(tmp_path / "r"), skip_bad=True, quiet=True, processes=1,
                        split=SplitOptions(mode="source"))
    with pytest.raises(DataError):
        build(opts)
    done = tmp_path / "r" / "work" / "records.done.json"
    stamp = os.path.getmtime(done)
    with pytest.raises(DataError):
        build(opts)
    assert os.path.getmtime(done) == stamp, "the finished record stage is reused, not redone"
    opts.clean.max_length = 2048
    with pytest.raises(DataError, match="other inputs or options"):
        build(opts)


def test_verify_finds_damage(tmp_path, sample_path):
    out = tmp_path / "v"
    m = build(BuildOptions(inputs=[sample_path], out=str(out), skip_bad=True, samples_per_shard=200, quiet=True,
                           processes=1))
    assert verify(str(out / "manifest.json"))["problems"] == []
    victim = out / m["shards"][0]["path"]
    data = victim.read_bytes()
    victim.write_bytes(data[:2048] + b"x" + data[2049:])
    problems = verify(str(out / "manifest.json"))["problems"]
    assert len(problems) == 1 and m["shards"][0]["path"] in problems[0]


def test_split_from_accession_lists(tmp_path, sample_path, sample_records):
    reviewed = list(dict.fromkeys(r.accession for r in sample_records
                                  if r.reviewed and r.function and 30 <= len(r.sequence) <= 1024))
    (tmp_path / "test.txt").write_text("\n".join(reviewed[:30]))
    (tmp_path / "valid.csv").write_text("AlphaFoldDB,function\n" + "\n".join(f"{a},x" for a in reviewed[30:50]))
    (tmp_path / "train.txt").write_text("\n".join(reviewed[50:]))
    m = build(BuildOptions(inputs=[sample_path], out=str(tmp_path / "l"), skip_bad=True, quiet=True, processes=1,
                           split=SplitOptions(mode="lists", lists={"train": str(tmp_path / "train.txt"),
                                                                    "valid": str(tmp_path / "valid.csv"),
                                                                    "test": str(tmp_path / "test.txt")})))
    assert m["split"]["counts"]["test"] == 30 and m["split"]["counts"]["valid"] == 20
    assert m["split"]["dropped"]["not_in_split_lists"] == 877 - len(reviewed)
    assert "violations" in m["split"]["homology_check"]  # reported, not fixed: the user chose the split


def test_mol_instructions_keep_their_own_split(tmp_path, mol_dir):
    m = build(BuildOptions(inputs=[f"{mol_dir}/general_function.json", f"{mol_dir}/domain_motif.json"],
                           out=str(tmp_path / "mi"), quiet=True, processes=2, split=SplitOptions(mode="source"),
                           clean=__import__("data_tools.clean", fromlist=["CleanOptions"]).CleanOptions(
                               max_length=4096)))
    assert m["records"]["records_read"] == 890 + 229
    assert m["split"]["counts"]["test"] > 0 and m["split"]["counts"]["valid"] == 0
    out = str(tmp_path / "mi")
    keys = [k for sp in ("train", "test") for k, _ in _samples(out, m, sp)]
    assert len(keys) == len(set(keys)) == m["records"]["kept"]
    assert any(k.endswith("_domain_motif") for k in keys)
