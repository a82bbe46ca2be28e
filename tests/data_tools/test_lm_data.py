"""Data for the decoder-only recipe: UniRef FASTA read against Biopython, language-model shards, ProLLaMA's Alpaca
rows, and the superfamily instruction set built from the shared UniProt sample."""
import gzip
import json
import os
import tarfile

import pytest

from data_tools.records import DataError

# real-looking UniRef headers: a name with commas and parentheses, a multi-word taxon, a missing RepID, a
# UniRef90 cluster, and a sequence wrapped at 60 residues
UNIREF = """>UniRef50_Q6GZX4 Putative transcription factor 001R n=2 Tax=Frog virus 3 TaxID=10493 RepID=001R_FRG3G
MAFSAEDVLKEYDRRRRMEALLLSLYYPNDRKLLDYKEWSPPRVQVECPKAPVEWNNPPSEKGLIVGHFSGIKYKGEKAQASEVDVNKMCCWVSKFKDAMRRYQGIQTCK
IPGKVLSDLDAKIKAYNLTVEGVEGFVRYSRVTKQHVAAFLKELRHSKQYENVNLIHYILTDKRVDIQHLEKDLVKDFKALVESAHRMRQGHMINVKYILYQLLKKHGHG
>UniRef50_A0A5A9P0L4 Peptidylprolyl isomerase, FKBP-type (fragment) n=1 Tax=Acipenser ruthenus (Sterlet) TaxID=7906
MTEEKAAEKPAEQKGEKKKNLGTVKVLQEGKGPRPSEGDRVTVHYTGRLEDGTVFDSSRSRNAPFSFTLGSGEVIKGWDEGLLGMKEGDKRKLIIPPHLGYG
>UniRef90_P0C9F0 Protein MGF 100-1R n=12 Tax=African swine fever virus TaxID=10497 RepID=1001R_ASFK5
MVRLFYNPIKYLFYRRSCKKRLRKALKKLNFYHPPKECCQIYRLLENAPGGTYFITENMTNELIMIAKDPVDKKIKSVKLYLTGNYIKINQHYYINIYMYLMRYNQIYKYP
LICS
"""


@pytest.fixture
def uniref(tmp_path):
    path = tmp_path / "uniref50.fasta.gz"
    with gzip.open(path, "wt") as f:
        f.write(UNIREF)
    return path


def test_uniref_fasta_reads_as_biopython_does_with_the_cluster_fields(uniref):
    from Bio import SeqIO
    from data_tools.readers.rows import iter_fasta, parse_fasta_header
    with gzip.open(uniref, "rt") as f:
        ref = [(r.description, str(r.seq)) for r in SeqIO.parse(f, "fasta")]
    ours = [(header, seq) for _, header, seq in iter_fasta(uniref)]
    assert ours == ref and len(ours) == 3
    h = [parse_fasta_header(d) for d, _ in ours]
    assert h[0] == {"accession": "UniRef50_Q6GZX4", "reviewed": None, "name": "Putative transcription factor 001R",
                    "organism": "Frog virus 3", "taxon_id": 10493, "cluster_size": 2, "representative": "001R_FRG3G"}
    assert h[1]["name"] == "Peptidylprolyl isomerase, FKBP-type (fragment)" and "representative" not in h[1]
    assert h[1]["organism"] == "Acipenser ruthenus (Sterlet)" and h[1]["taxon_id"] == 7906
    assert h[2]["accession"] == "UniRef90_P0C9F0" and h[2]["cluster_size"] == 12


def test_language_model_shards_hold_the_formatted_sequence_and_the_cluster(uniref, tmp_path):
    from data_tools.build import BuildOptions, build
    from data_tools.clean import CleanOptions
    from data_tools.split import SplitOptions
    lists = tmp_path / "train.txt"
    lists.write_text("UniRef50_Q6GZX4\nUniRef50_A0A5A9P0L4\nUniRef90_P0C9F0\n")
    m = build(BuildOptions(inputs=[str(uniref)], out=str(tmp_path / "lm"), quiet=True, processes=1,
                           clean=CleanOptions(lm_text="Seq=<{sequence}>", max_length=200),
                           split=SplitOptions(mode="lists", lists={"train": str(lists)})))
    assert m["records"]["kept"] == 2 and m["records"]["dropped"] == {"too_long": 1}    # counted, not lost
    assert m["sample"]["txt"] == "language-model text (UTF-8): Seq=<{sequence}>"
    with tarfile.open(tmp_path / "lm" / m["shards"][0]["path"]) as t:
        files = {n: t.extractfile(n).read().decode() for n in t.getnames()}
    assert files["UniRef50_A0A5A9P0L4.txt"] == "Seq=<" + files["UniRef50_A0A5A9P0L4.seq"] + ">"
    meta = json.loads(files["UniRef50_A0A5A9P0L4.json"])
    assert meta["cluster_size"] == 1 and meta["organism"] == "Acipenser ruthenus (Sterlet)"
    with pytest.raises(DataError, match=r"--lm-text.*does not write the sequence"):
        build(BuildOptions(inputs=[str(uniref)], out=str(tmp_path / "x"), clean=CleanOptions(lm_text="Seq=<>")))
    with pytest.raises(DataError, match=r"--lm-text.*not a format"):
        build(BuildOptions(inputs=[str(uniref)], out=str(tmp_path / "x"), clean=CleanOptions(lm_text="{seq}")))
    with pytest.raises(DataError, match=r"FASTA carries no function text.*--lm-text"):
        build(BuildOptions(inputs=[str(uniref)], out=str(tmp_path / "y"), quiet=True, processes=1))


def test_alpaca_rows_take_the_protein_from_output_or_input_and_name_bad_rows(tmp_path):
    from data_tools.readers import detect_format, read_records
    rows = [{"instruction": "[Generate by superfamily]", "input": "Superfamily=<Globin-like superfamily>",
             "output": "Seq=<MKVLAAGIVG>"},
            {"instruction": "[Determine superfamily]", "input": "Seq=<MSTNPKPQRK>",
             "output": "Superfamily=<Globin-like superfamily>", "accession": "P1", "metadata": {"split": "test"}},
            {"instruction": "[Determine superfamily]", "input": "no protein here", "output": "x"}]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(rows))
    assert detect_format(path) == "alpaca"
    with pytest.raises(DataError, match=r"record #2 \(row2\): no protein written as Seq=<...>"):
        list(read_records(path))
    a, b = read_records(path, skip_bad=True)
    assert (a.sequence, a.task, a.input, a.function) == ("MKVLAAGIVG", "generate_by_superfamily",
                                                         "Superfamily=<Globin-like superfamily>", "Seq=<MKVLAAGIVG>")
    assert (b.accession, b.sequence, b.task, b.source_split) == ("P1", "MSTNPKPQRK", "determine_superfamily", "test")
    path.write_text(json.dumps([{"instruction": "[Determine superfamily]", "input": "Seq=<MKJ1>", "output": "y"}]))
    with pytest.raises(DataError, match="non-amino-acid letter 'J' at residue 3"):
        list(read_records(path))


def test_superfamily_tasks_from_the_shared_uniprot_sample(sample_path, tmp_path):
    from data_tools.readers import read_records
    from data_tools.tasks import superfamily_tasks
    rep = superfamily_tasks([sample_path], str(tmp_path / "sf.json"), label="supfam", min_members=2,
                            skip_bad=True, quiet=True)
    rows = json.load(open(tmp_path / "sf.json"))
    assert rep["rows"] == len(rows) == 2 * rep["proteins"] and rep["proteins"] > 300
    assert rep["dropped"]["rare_label"] > 0 and rep["dropped"]["unreviewed"] == 156
    q8 = [r for r in rows if r["accession"] == "Q8THH1"]
    label = "Methyl-coenzyme M reductase alpha and beta chain C-terminal domain, Methyl-coenzyme M reductase subunits"
    assert q8[0] == {"instruction": "[Generate by superfamily]", "input": f"Superfamily=<{label}>",
                     "output": q8[1]["input"], "accession": "Q8THH1", "task": "generate_by_superfamily"}
    assert q8[1]["output"] == f"Superfamily=<{label}>" and q8[1]["input"].startswith("Seq=<MAADIFAKFK")
    superfamily_tasks([sample_path], str(tmp_path / "sim.json"), label="similarity", tasks=("determine",),
                      skip_bad=True, quiet=True)
    sim = {r["accession"]: r["output"] for r in json.load(open(tmp_path / "sim.json"))}
    assert sim["Q8THH1"] == "Superfamily=<methyl-coenzyme M reductase alpha subunit family>"
    assert {r.task for r in read_records(tmp_path / "sf.json")} == {"generate_by_superfamily", "determine_superfamily"}
    with pytest.raises(DataError, match="unknown label source"):
        superfamily_tasks([sample_path], str(tmp_path / "x.json"), label="go")
