import csv
import gzip
import json

from data_tools.readers import FORMATS, chunks, detect_format, parse, read_records
from data_tools.records import AMINO_ACIDS


def test_flat_file_reads_every_record_of_the_sample(sample_path, sample_records):
    n_entries = sum(1 for line in gzip.open(sample_path, "rt") if line.startswith("//"))
    assert n_entries == 1203
    assert len(sample_records) == n_entries           # the stray text block costs no real record
    assert sum(r.reviewed for r in sample_records) == 1047
    assert len({r.accession for r in sample_records}) == 1186
    assert all(set(r.sequence) <= AMINO_ACIDS for r in sample_records)
    lengths = [len(r.sequence) for r in sample_records]
    assert (min(lengths), max(lengths)) == (29, 4857)


def test_flat_file_fields(sample_records):
    r = next(r for r in sample_records if r.accession == "Q8THH1")
    assert r.name == "Methyl-coenzyme M reductase subunit alpha"
    assert r.taxon_id == 188937 and r.organism.startswith("Methanosarcina acetivorans (strain ATCC 35395")
    assert len(r.sequence) == 570 and r.sequence.startswith("MAADIFAKFK")
    # wrapped at a hyphen in the file: joined without a space
    assert "2-(methylthio)ethanesulfonate" in r.function
    multi = [x for x in sample_records if x.function.count("[") and "]: " in x.function]
    assert multi, "entries with several FUNCTION blocks must keep all of them"


def test_flat_file_matches_biopython(tmp_path, sample_path, sample_records):
    """Biopython's SwissProt parser is an independent reference for the same file."""
    from Bio import SwissProt
    # Biopython cannot skip the non-record text block; give it the file without it.
    text = gzip.open(sample_path, "rt").read()
    start = text.index("SNORD3A is a non-coding")
    text = text[:start] + text[text.index("ID   ", start):]
    (tmp_path / "clean.dat").write_text(text)
    ref = {}
    with open(tmp_path / "clean.dat") as f:
        for rec in SwissProt.parse(f):
            ref.setdefault(rec.accessions[0], rec)
    ours = {}
    for r in sample_records:
        ours.setdefault(r.accession, r)
    assert ours.keys() == ref.keys()
    for acc, r in ours.items():
        b = ref[acc]
        assert r.sequence == b.sequence, acc
        assert r.taxon_id == int(b.taxonomy_id[0]), acc
        assert r.reviewed == (b.data_class == "Reviewed"), acc
        assert r.organism == b.organism.rstrip("."), acc
        has_function = any(c.startswith("FUNCTION:") for c in b.comments)
        assert bool(r.function) == has_function, acc


def _rest_json(records):
    """Records in the UniProt REST API's JSON shape (the fields the reader uses, as the API names them)."""
    return {"results": [{
        "entryType": "UniProtKB reviewed (Swiss-Prot)" if r.reviewed else "UniProtKB unreviewed (TrEMBL)",
        "primaryAccession": r.accession,
        "proteinDescription": {"recommendedName": {"fullName": {"value": r.name}}},
        "organism": {"scientificName": r.organism, "taxonId": r.taxon_id},
        "comments": [{"commentType": "FUNCTION", "texts": [{"value": r.function, "evidences": []}]}]
        if r.function else [{"commentType": "SUBUNIT", "texts": [{"value": "Monomer."}]}],
        "sequence": {"value": r.sequence, "length": len(r.sequence)},
    } for r in records]}


FIELDS = ("accession", "sequence", "function", "name", "organism", "taxon_id", "reviewed")


def _same(a, b, fields=FIELDS):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in fields:
            assert getattr(x, f) == getattr(y, f), (x.accession, f)


def test_rest_json_and_jsonl(tmp_path, sample_records):
    recs = sample_records[:300]
    p = tmp_path / "uniprot.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump(_rest_json(recs), f)
    assert detect_format(p) == "uniprot-json"
    _same(list(read_records(p)), recs)
    jl = tmp_path / "uniprot.jsonl"
    jl.write_text("".join(json.dumps(e) + "\n" for e in _rest_json(recs)["results"]))
    _same(list(read_records(jl)), recs)


def test_uniprot_tsv(tmp_path, sample_records):
    recs = sample_records[:200]
    p = tmp_path / "uniprot.tsv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["Entry", "Reviewed", "Protein names", "Organism", "Organism (ID)", "Sequence", "Function [CC]"])
        for r in recs:
            w.writerow([r.accession, "reviewed" if r.reviewed else "unreviewed", f"{r.name} (Alt name)",
                        r.organism, r.taxon_id, r.sequence, f"FUNCTION: {r.function}" if r.function else ""])
    got = list(read_records(p))
    _same(got, recs, ("accession", "sequence", "name", "organism", "taxon_id", "reviewed"))
    from data_tools.clean import clean_function_text
    for g, r in zip(got, recs):
        assert clean_function_text(g.function.replace("FUNCTION: ", "")) == clean_function_text(r.function)


def test_prot2text_csv(tmp_path, sample_records):
    recs = [r for r in sample_records if r.function][:150]
    p = tmp_path / "train.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["AlphaFoldDB", "name", "Full Name", "taxon", "sequence", "function"])
        for r in recs:
            w.writerow([r.accession, "X_HUMAN", r.name, r.taxon_id, r.sequence, r.function])
    got = list(read_records(p))
    _same(got, recs, ("accession", "sequence", "function", "name", "taxon_id"))
    assert all(g.reviewed is None for g in got)  # the format does not say


def test_fasta_with_annotation_table(tmp_path, sample_records):
    recs = [r for r in sample_records if r.function][:120]
    fa = tmp_path / "p.fasta"
    with open(fa, "w") as f:
        for r in recs:
            pre = "sp" if r.reviewed else "tr"
            f.write(f">{pre}|{r.accession}|X_Y {r.name} OS={r.organism} OX={r.taxon_id} GN=abc PE=1 SV=1\n")
            for i in range(0, len(r.sequence), 60):
                f.write(r.sequence[i:i + 60] + "\n")
    ann = tmp_path / "ann.tsv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["accession", "function"])
        for r in recs:
            w.writerow([r.accession, r.function])
    got = list(read_records(fa, annotations=str(ann)))
    _same(got, recs)


def test_mol_instructions(mol_dir):
    counts = {}
    for name in ("general_function", "protein_function", "catalytic_activity", "domain_motif"):
        recs = list(read_records(f"{mol_dir}/{name}.json"))
        counts[name] = len(recs)
        assert all(r.sequence and set(r.sequence) <= AMINO_ACIDS for r in recs)
        assert all(r.instruction and r.function and r.source_split in ("train", "test") for r in recs)
    assert counts == {"general_function": 890, "protein_function": 1412, "catalytic_activity": 273,
                      "domain_motif": 229}
    g = next(iter(read_records(f"{mol_dir}/general_function.json")))
    raw = json.load(open(f"{mol_dir}/general_function.json"))[0]
    assert g.accession == raw["metadata"]["protein_accession"] and g.task == "general_function"
    # metadata.seq_len is the full protein; Mol-Instructions' input holds a truncated copy, which is what we read
    assert len(g.sequence) < raw["metadata"]["seq_len"]
    assert raw["input"].replace("`", "").split() == [g.sequence]


def test_plain_and_gzip_give_the_same_chunks(tmp_path, sample_path):
    plain = tmp_path / "s.dat"
    plain.write_bytes(gzip.open(sample_path).read())
    a = [r for c in chunks(sample_path) for r in parse(c, True)[0]]
    b = [r for c in chunks(plain) for r in parse(c, True)[0]]
    assert [(r.accession, r.sequence) for r in a] == [(r.accession, r.sequence) for r in b]


def test_every_format_is_detectable_or_named():
    assert set(FORMATS) == {"uniprot-flat", "uniprot-json", "uniprot-jsonl", "tsv", "csv", "fasta",
                            "mol-instructions", "conversations", "alpaca"}


def test_protein2text_conversations_are_detected_by_their_first_bytes(tmp_path):
    p = tmp_path / "qa.json"
    p.write_text('[{"id": "P1", "protein": "MKTAYIAKQR", "conversations": [{"from": "gpt", "value": "x"}]}]')
    assert detect_format(p) == "conversations"
