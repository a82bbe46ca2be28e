"""3D structures through the data path: real PDB/mmCIF files read and aligned to their SEQRES, AlphaFold-style
models with pLDDT, bad structures named or counted, shards with coordinates, crops that keep them aligned."""
import gzip
import io
import json
import os
import random
import tarfile

import numpy as np
import pytest

from data_tools import structures as S
from data_tools.build import BuildOptions, build
from data_tools.records import DataError
from data_tools.split import SplitOptions
from tests.conftest import ROOT
from tests.synthetic import fold_coords, write_pdb

STRUCTURES = os.path.join(os.path.dirname(ROOT), "shared", "data", "structures")


def _shared():
    if not os.path.isdir(STRUCTURES):
        pytest.skip(f"{STRUCTURES} not present")
    return sorted(os.path.join(STRUCTURES, f) for f in os.listdir(STRUCTURES))


def _chains_with_seqres(path):
    """The parsed file and (chain name, SEQRES one-letter sequence) of every protein chain of model 1."""
    st = S.parse_structure(open(path, "rb").read(), path)
    return st, S.seqres_chains(st)


def test_real_files_align_to_their_seqres_with_the_parsers_own_coordinates():
    """Every protein chain of the shared PDB/mmCIF files (several models and chains, MSE, insertion codes,
    alternate locations, SEQRES residues never observed) read for its SEQRES sequence: identity 1, every observed
    C-alpha placed at the SEQRES position gemmi's own label_seq numbering gives it (independent of our alignment,
    which works from residue names and numbering), with the coordinates gemmi reads; unobserved ones missing."""
    chains = gaps = 0
    for path in _shared():
        st, found = _chains_with_seqres(path)
        st.assign_label_seq_id(False)         # gemmi's SEQRES numbering of the observed residues (PDB files too)
        for name, seq in found:
            s = S.read_structure(open(path, "rb").read(), path, os.path.basename(path), seq, chain=name)
            assert s.identity == 1.0 and s.chain == name and s.plddt is None
            want = {}
            for r in st[0][name].get_polymer():
                ca = r.find_atom("CA", "*")
                if ca is not None and r.label_seq:
                    want[r.label_seq - 1] = (ca.pos.x, ca.pos.y, ca.pos.z)
            assert sorted(np.flatnonzero(s.mask)) == sorted(want), (path, name)
            for i, xyz in want.items():
                np.testing.assert_array_equal(s.coords[i], np.float32(xyz))
            assert (s.coords[~s.mask] == 0).all()
            chains += 1
            gaps += int((~s.mask).sum())
    assert chains >= 20 and gaps > 100      # 2XHE/2BEG/2OFG/7DDO leave SEQRES residues unobserved


def test_the_chain_is_found_and_dna_chains_are_not_protein():
    path = os.path.join(STRUCTURES, "1LCD.pdb.gz")
    if not os.path.exists(path):
        pytest.skip("shared structures not present")
    _, found = _chains_with_seqres(path)
    seq = dict(found)["A"]
    assert S.read_structure(open(path, "rb").read(), path, "1LCD", seq).chain == "A"   # chain picked by alignment
    with pytest.raises(DataError) as e:
        S.read_structure(open(path, "rb").read(), path, "1LCD", seq, chain="B")        # B is DNA
    assert e.value.kind == "missing_chain" and "1LCD" in str(e.value) and "chains: B, C, A" in str(e.value)


def test_selenomethionine_matches_the_records_methionine():
    path = os.path.join(STRUCTURES, "1A8O.cif.gz")
    if not os.path.exists(path):
        pytest.skip("shared structures not present")
    _, found = _chains_with_seqres(path)
    seq = found[0][1]
    assert seq[0] == "M"                     # MSE in SEQRES, as its parent
    s = S.read_structure(open(path, "rb").read(), path, "1A8O", seq)
    assert s.identity == 1.0 and s.mask.all()


def _af_model(tmp_path, acc="Q00001", n=40, plddt=None, seed=0):
    rng = random.Random(seed)
    seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(n))
    coords = fold_coords("alpha helix", n, rng)
    path = tmp_path / f"AF-{acc}-F1-model_v4.pdb"
    write_pdb(str(path), acc, seq, coords, plddt)
    return path, seq, coords


def test_alphafold_model_keeps_plddt_and_is_found_by_accession(tmp_path):
    plddt = np.linspace(30, 98, 40).round(2)
    path, seq, coords = _af_model(tmp_path, plddt=plddt)
    with open(path, "rb") as f:
        (tmp_path / "gz").mkdir()
        (tmp_path / "gz" / "AF-Q00002-F1-model_v4.pdb.gz").write_bytes(gzip.compress(f.read()))
    src = S.StructureSource(str(tmp_path))
    assert set(src.index) == {"Q00001", "Q00002"}
    data, where, chain = src.find("Q00001")
    s = S.read_structure(data, where, "Q00001", seq, chain)
    np.testing.assert_allclose(s.plddt, plddt, atol=1e-2)
    np.testing.assert_allclose(s.coords, coords, atol=1e-3)          # PDB's 3 decimals
    data, where, _ = src.find("Q00002")
    assert S.read_structure(data, where, "Q00002", seq).mask.all()  # gzipped the same
    # a record longer than the model (a fragment): the residues outside it are missing, not invented
    longer = "MKV" + seq + "GG"
    s = S.read_structure(*src.find("Q00001")[:2], "Q00001", longer)
    assert s.mask.sum() == 40 and not s.mask[:3].any() and not s.mask[-2:].any() and s.coverage < 1


def test_a_tar_of_structures_and_a_map_file(tmp_path):
    path, seq, _ = _af_model(tmp_path)
    tar = tmp_path / "models.tar"
    with tarfile.open(tar, "w") as t:
        t.add(path, arcname="models/" + path.name)
    src = S.StructureSource(str(tar))
    data, where, _ = src.find("Q00001")
    assert where.endswith("models/AF-Q00001-F1-model_v4.pdb") and S.read_structure(data, where, "Q00001", seq)
    (tmp_path / "map.tsv").write_text(f"P12345\t{path.name}\tA\n")
    src = S.StructureSource(None, str(tmp_path / "map.tsv"))
    assert src.find("P12345")[2] == "A" and src.find("Q00001") is None


@pytest.mark.parametrize("damage,kind", [
    ("mismatch", "sequence_mismatch"), ("nan", "bad_coordinates"), ("collapsed", "bad_coordinates"),
    ("cut_text", "truncated_structure"), ("cut_gzip", "truncated_structure"), ("chain", "missing_chain"),
    ("garbage", "malformed_structure")])
def test_bad_structures_are_named(tmp_path, damage, kind):
    path, seq, _ = _af_model(tmp_path)
    text = path.read_text()
    chain = None
    if damage == "mismatch":
        seq = "".join("W" if c != "W" else "A" for c in seq)       # another protein
    elif damage == "nan":
        lines = text.splitlines()
        lines[5] = lines[5][:30] + f"{'nan':>8}" + lines[5][38:]
        text = "\n".join(lines) + "\n"
    elif damage == "collapsed":
        lines = text.splitlines()
        lines[6] = lines[6][:30] + lines[5][30:54] + lines[6][54:]  # residue 6 where residue 5 is
        text = "\n".join(lines) + "\n"
    elif damage == "cut_text":
        text = text[: len(text) // 2]
    elif damage == "chain":
        chain = "Z"
    elif damage == "garbage":
        text = "data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x 1\n"
    data = gzip.compress(text.encode())[:-30] if damage == "cut_gzip" else text.encode()
    with pytest.raises(DataError) as e:
        S.read_structure(data, str(path), "Q00001", seq, chain)
    assert e.value.kind == kind and str(path) in str(e.value) and "Q00001" in str(e.value), str(e.value)


def _records(tmp_path, n=6):
    """FASTA + annotations of n proteins: structures for the first four (one damaged, one partial), none after."""
    rng = random.Random(1)
    (tmp_path / "st").mkdir()
    fa, ann = [], ["accession\tfunction"]
    for i in range(n):
        acc = f"A{i:05d}"
        seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(40 + i))
        fa.append(f">{acc}\n{seq}")
        ann.append(f"{acc}\tFunction {i}.")
        if i < 4:
            model = seq[5:] if i == 1 else seq                     # i=1: the model misses 5 residues
            if i == 2:
                model = "".join("W" if c != "W" else "A" for c in seq)   # the model of another protein
            write_pdb(str(tmp_path / "st" / f"AF-{acc}-F1-model_v4.pdb"), acc, model,
                      fold_coords("beta strand", len(model), rng))
    (tmp_path / "p.fasta").write_text("\n".join(fa) + "\n")
    (tmp_path / "p.tsv").write_text("\n".join(ann) + "\n")
    (tmp_path / "train.txt").write_text("\n".join(f"A{i:05d}" for i in range(n)) + "\n")


def _build(tmp_path, out, **kw):
    return build(BuildOptions(inputs=[str(tmp_path / "p.fasta")], annotations=str(tmp_path / "p.tsv"),
                              out=str(tmp_path / out), quiet=True, processes=1, structures=str(tmp_path / "st"),
                              split=SplitOptions(mode="lists", lists={"train": str(tmp_path / "train.txt")}), **kw))


def test_build_writes_coordinates_and_counts_every_kind(tmp_path):
    _records(tmp_path)
    with pytest.raises(DataError) as e:                       # a bad structure stops the build, named ...
        _build(tmp_path, "strict")
    assert e.value.kind == "sequence_mismatch" and "A00002" in str(e.value)
    man = _build(tmp_path, "data", skip_bad=True)             # ... or is counted, the record kept sequence-only
    assert man["structures"] == {"full": 2, "partial": 1, "none": 2, "bad_sequence_mismatch": 1, "plddt": 3}
    assert man["records"]["kept"] == 6 and man["splits"]["train"]["count"] == 6
    from data_tools.shards import iter_shard_samples
    got = {}
    for sh in man["shards"]:
        for key, members in iter_shard_samples(str(tmp_path / "data" / sh["path"])):
            got[key] = members
    assert set(got) == {f"A{i:05d}" for i in range(6)}
    assert {k for k, m in got.items() if "coords.npy" in m} == {"A00000", "A00001", "A00003"}
    c, m = S.load_npy(got["A00001"]["coords.npy"]), S.load_npy(got["A00001"]["coords_mask.npy"])
    assert c.shape == (41, 3) and c.dtype == np.float32 and m.sum() == 36 and not m[:5].any()
    assert S.load_npy(got["A00000"]["plddt.npy"]).shape == (40,)


def test_loader_crops_coordinates_with_the_sequence_and_drops_structures_by_seed(tmp_path):
    from megatron_p2t.data.loader import LoaderConfig, ProteinTextLoader
    _records(tmp_path)
    man = str(tmp_path / "data" / "manifest.json")
    _build(tmp_path, "data", skip_bad=True)
    full = {}
    from data_tools.shards import iter_shard_samples
    for sh in json.load(open(man))["shards"]:
        for key, m in iter_shard_samples(str(tmp_path / "data" / sh["path"])):
            if "coords.npy" in m:
                full[key] = (m["seq"].decode(), S.load_npy(m["coords.npy"]))
    cfg = LoaderConfig(manifest=man, batch_size=6, max_protein_residues=20, num_workers=0, structure=True,
                       epochs=1)
    b = next(iter(ProteinTextLoader(cfg)))
    from megatron_p2t.data import esm_alphabet
    for i, key in enumerate(b["keys"]):
        if key not in full:
            assert not b["coords_mask"][i].any()
            continue
        seq, coords = full[key]
        window = esm_alphabet.decode(b["protein_ids"][i][1:21].tolist())
        a = seq.find(window)
        assert a >= 0
        known = b["coords_mask"][i][1:21].numpy()
        np.testing.assert_array_equal(b["protein_coords"][i][1:21].numpy()[known], coords[a:a + 20][known])
        assert not b["coords_mask"][i][0] and not b["coords_mask"][i][21:].any()   # <cls>, <eos>, padding
    kept = lambda p: sum(bool(x.any()) for x in next(iter(ProteinTextLoader(
        LoaderConfig(manifest=man, batch_size=6, num_workers=0, structure=True, structure_dropout=p,
                     epochs=1))))["coords_mask"])
    assert kept(0.0) == 3 and kept(0.999) == 0 and kept(0.5) == kept(0.5)   # seeded: the same each pass
