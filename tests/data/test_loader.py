import dataclasses
import itertools
import json
import os
import shutil

import numpy as np
import pytest

from megatron_p2t.data import esm_alphabet
from megatron_p2t.data.loader import LoaderConfig, ProteinTextLoader
from megatron_p2t.data.shards import ShardError
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from tests.conftest import split_keys


@pytest.fixture
def cfg(built_sample, tiny_tokenizer):
    out, _ = built_sample
    return LoaderConfig(manifest=os.path.join(out, "manifest.json"), text_tokenizer=tiny_tokenizer, batch_size=16,
                        num_workers=0, chunk=10, shuffle_block=100, seed=1)




def _valid_keys(batch):
    return [k for k, v in zip(batch["keys"], batch["valid"].tolist()) if v]


def test_finite_pass_exactly_once_and_independent_of_workers(cfg, built_sample):
    runs = {}
    for workers in (0, 2, 3):
        c = dataclasses.replace(cfg, epochs=1, num_workers=workers)
        loader = ProteinTextLoader(c, 0, 1)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch()
        assert all(b["protein_ids"].shape[0] == 16 for b in batches)
        runs[workers] = [k for b in batches for k in _valid_keys(b)]
    assert sorted(runs[0]) == split_keys(built_sample)
    assert runs[0] == runs[2] == runs[3]


def test_data_parallel_ranks_partition_the_data_with_equal_steps(cfg, built_sample):
    for dp in (2, 3, 4):
        per_rank = [list(ProteinTextLoader(dataclasses.replace(cfg, epochs=1, num_workers=2), r, dp))
                    for r in range(dp)]
        assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of steps"
        keys = [k for batches in per_rank for b in batches for k in _valid_keys(b)]
        assert sorted(keys) == split_keys(built_sample)


def test_endless_stream_covers_each_epoch_exactly_once(cfg, built_sample):
    total = len(split_keys(built_sample))
    by_epoch = {0: [], 1: []}
    for r in range(2):
        it = iter(ProteinTextLoader(dataclasses.replace(cfg, num_workers=2), r, 2))
        for b in itertools.islice(it, (2 * total) // (2 * 16) + 20):
            for k, e in zip(b["keys"], b["epochs"]):
                if e in by_epoch:
                    by_epoch[e].append(k)
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == split_keys(built_sample)


@pytest.mark.parametrize("mode", ["fixed", "tokens"])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(cfg, mode):
    if mode == "tokens":
        cfg = dataclasses.replace(cfg, batch_size=None, max_tokens=6000)
    full = ProteinTextLoader(dataclasses.replace(cfg, num_workers=2), 0, 2)
    it = iter(full)
    ref, states = [], []
    for b in itertools.islice(it, 70):  # past one epoch of this rank (~395 samples)
        ref.append(b["keys"])
        states.append(full.state_dict())
    for cut in (0, 7, 23, 41):
        resumed = ProteinTextLoader(dataclasses.replace(cfg, num_workers=2), 0, 2, state=states[cut])
        got = [b["keys"] for b in itertools.islice(iter(resumed), 70 - cut - 1)]
        assert got == ref[cut + 1:], f"resume after batch {cut}"


def test_resume_in_finite_pass_gives_the_rest(cfg, built_sample):
    c = dataclasses.replace(cfg, epochs=1)
    a = ProteinTextLoader(c, 0, 1)
    it = iter(a)
    first = [_valid_keys(next(it)) for _ in range(9)]
    rest = [_valid_keys(b) for b in ProteinTextLoader(c, 0, 1, state=a.state_dict())]
    assert sorted(k for b in first + rest for k in b) == split_keys(built_sample)


def test_token_budget_and_bucketing(cfg):
    budget = 6000
    tok = ProteinTextLoader(dataclasses.replace(cfg, batch_size=None, max_tokens=budget), 0, 1)
    for b in itertools.islice(iter(tok), 60):
        rows = b["protein_ids"].shape[0]
        assert rows * (b["protein_ids"].shape[1] + b["text_ids"].shape[1]) <= budget
    fixed = ProteinTextLoader(dataclasses.replace(cfg, batch_size=8), 0, 1)
    for _ in itertools.islice(iter(fixed), 60):
        pass
    assert tok.padding_fraction() < fixed.padding_fraction() - 0.1, (tok.padding_fraction(), fixed.padding_fraction())


def test_tokenisation_matches_the_tokenizers(cfg, built_sample):
    tok = load_text_tokenizer(cfg.text_tokenizer)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    b = next(iter(ProteinTextLoader(cfg, 0, 1)))
    out, m = built_sample
    from data_tools.shards import iter_shard_samples
    raw = {k: s for sh in m["shards"] for k, s in iter_shard_samples(os.path.join(out, sh["path"]))}
    for i, k in enumerate(b["keys"]):
        s = raw[k]
        n = int(b["protein_mask"][i].sum())
        assert np.array_equal(b["protein_ids"][i, :n].numpy(), esm_alphabet.encode(s["seq"]))
        t = tok(s["txt"].decode(), add_special_tokens=False)["input_ids"][: cfg.max_text_tokens - 1] + [eot]
        assert b["text_ids"][i, : int(b["text_mask"][i].sum())].tolist() == t
        assert b["meta"][i] == json.loads(s["json"])


def test_long_proteins_are_cropped_to_a_window(cfg, built_sample):
    c = dataclasses.replace(cfg, max_protein_residues=50, epochs=1)
    out, m = built_sample
    from data_tools.shards import iter_shard_samples
    seqs = {k: s["seq"].decode() for sh in m["shards"] for k, s in iter_shard_samples(os.path.join(out, sh["path"]))}
    runs = []
    for _ in range(2):
        crops = {}
        for b in ProteinTextLoader(c, 0, 1):
            assert b["protein_ids"].shape[1] <= 52
            for i, k in enumerate(_valid_keys(b)):
                crops[k] = esm_alphabet.decode(b["protein_ids"][i].tolist())
        runs.append(crops)
    assert runs[0] == runs[1], "crops are seeded, so a rerun (or a resume) sees the same windows"
    for k, w in runs[0].items():
        assert len(w) == min(50, len(seqs[k])) and w in seqs[k]


def _copy(built_sample, tmp_path):
    out, m = built_sample
    dst = tmp_path / "copy"
    shutil.copytree(out, dst, ignore=shutil.ignore_patterns("work"))
    return dst, m


def test_corrupt_shard_is_named(cfg, built_sample, tmp_path):
    dst, m = _copy(built_sample, tmp_path)
    victim = next(s for s in m["shards"] if s["split"] == "train")
    p = dst / victim["path"]
    p.write_bytes(p.read_bytes()[:3000])
    c = dataclasses.replace(cfg, manifest=str(dst / "manifest.json"), epochs=1, num_workers=2)
    with pytest.raises(Exception) as e:
        list(ProteinTextLoader(c, 0, 1))
    assert victim["path"] in str(e.value) and "data_tools verify" in str(e.value)


def test_shard_with_fewer_samples_than_the_manifest(cfg, built_sample, tmp_path):
    dst, m = _copy(built_sample, tmp_path)
    man = json.load(open(dst / "manifest.json"))
    victim = next(s for s in man["shards"] if s["split"] == "train")
    victim["count"] += 5
    json.dump(man, open(dst / "manifest.json", "w"))
    c = dataclasses.replace(cfg, manifest=str(dst / "manifest.json"), epochs=1)
    with pytest.raises(ShardError, match="the manifest says"):
        list(ProteinTextLoader(c, 0, 1))


def test_state_from_another_layout_is_refused(cfg):
    a = ProteinTextLoader(cfg, 0, 2)
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        ProteinTextLoader(cfg, 0, 4, state=a.state_dict())


def test_config_errors(cfg):
    with pytest.raises(ValueError, match="exactly one"):
        ProteinTextLoader(dataclasses.replace(cfg, max_tokens=9000), 0, 1)
    with pytest.raises(ValueError, match="finite pass"):
        ProteinTextLoader(dataclasses.replace(cfg, batch_size=None, max_tokens=9000, epochs=1), 0, 1)
    with pytest.raises(ValueError, match="cannot hold one sample"):
        ProteinTextLoader(dataclasses.replace(cfg, batch_size=None, max_tokens=100), 0, 1)
    with pytest.raises(FileNotFoundError, match="data_tools build"):
        ProteinTextLoader(dataclasses.replace(cfg, manifest="/nonexistent/manifest.json"), 0, 1)
    with pytest.raises(ValueError, match="no shards"):
        ProteinTextLoader(dataclasses.replace(cfg, split="nosuch"), 0, 1)
