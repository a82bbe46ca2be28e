"""Every kind of bad input: a clear error naming the file and the record/line, or a count under --skip-bad."""
import json

import pytest

from data_tools.build import BuildOptions, build
from data_tools.cli import main as data_tools_main
from data_tools.readers import read_records
from data_tools.records import DataError

GOOD = """ID   TEST1_HUMAN             Reviewed;          40 AA.
AC   P99901;
DE   RecName: Full=Test protein one;
OS   Homo sapiens (Human).
OX   NCBI_TaxID=9606;
CC   -!- FUNCTION: Binds things (PubMed:1). {ECO:0000269}.
SQ   SEQUENCE   40 AA;  4000 MW;  0000000000000000 CRC64;
     MKTAYIAKQR QISFVKSHFS RQLEERLGLI EVQAPILSRV
//
"""


def _entry(acc="P99902", seq="MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV", sq_len=None, drop=None):
    lines = GOOD.replace("P99901", acc).replace("TEST1", acc).splitlines()
    body = " ".join(seq[i:i + 10] for i in range(0, len(seq), 10))
    lines[6] = f"SQ   SEQUENCE   {sq_len or len(seq)} AA;  4000 MW;  0000000000000000 CRC64;"
    lines[7] = "     " + body
    if drop:
        lines = [x for x in lines if not x.startswith(drop)]
    return "\n".join(lines) + "\n"


def _write(tmp_path, text, name="in.dat"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _error(path, **kw):
    with pytest.raises(DataError) as e:
        list(read_records(path, **kw))
    return e.value


CASES = {
    "missing SQ block": (_entry(drop="SQ"), "no SQ (sequence) block", "P99902", "truncated_record"),
    "length mismatch": (_entry(sq_len=45), "40 residues but its SQ line says 45", "P99902", "truncated_record"),
    "missing AC": (_entry(drop="AC"), "no AC (accession) line", None, "malformed"),
    "non-amino-acid letter": (_entry(seq="MKTAYIAKQRQIS1VKSHFSRQLEERLGLIEVQAPILSRJ"),
                              "non-amino-acid letter '1' at residue 14", "P99902", "invalid_residues"),
    "stray text": ("Some note that is not a record.\n" + _entry(), "not a UniProt record", None, "stray_text"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_flat_records(tmp_path, case):
    bad, message, record, kind = CASES[case]
    path = _write(tmp_path, GOOD + bad + GOOD.replace("P99901", "P99903"))
    e = _error(path)
    assert message in str(e) and path in str(e) and "line" in str(e)
    if record:
        assert f"record {record}" in str(e)
    assert e.fix, "every error says what to do"
    got = [r.accession for r in read_records(path, skip_bad=True)]
    assert "P99901" in got and "P99903" in got
    assert kind == e.kind


def test_skip_bad_counts_by_kind_in_the_build_report(tmp_path):
    text = GOOD + "".join(CASES[c][0] for c in sorted(CASES)) + GOOD.replace("P99901", "P99903")
    path = _write(tmp_path, text)
    opts = BuildOptions(inputs=[path], out=str(tmp_path / "out"), skip_bad=True, quiet=True, processes=1)
    opts.split.mode = "source"
    with pytest.raises(DataError, match="no train/valid/test split"):
        build(opts)  # (flat files carry no split: the message says so; the record stage already ran)
    rep = json.load(open(tmp_path / "out" / "work" / "records.done.json"))
    # the stray-text case also carries a good record after the note, which is read
    assert rep["bad_input"] == {"truncated_record": 2, "malformed": 1, "invalid_residues": 1, "stray_text": 1}
    assert rep["kept"] == 3 and rep["records_read"] == 3


def test_truncated_gzip(tmp_path, sample_path):
    data = open(sample_path, "rb").read()
    p = tmp_path / "cut.dat.gz"
    p.write_bytes(data[: len(data) // 3])
    e = _error(str(p))
    assert e.kind == "truncated_file" and "download it again" in str(e) and str(p) in str(e)
    # --skip-bad keeps what was read before the damage; the build counts the truncation
    opts = BuildOptions(inputs=[str(p)], out=str(tmp_path / "o"), skip_bad=True, quiet=True, processes=1)
    with pytest.raises(DataError):
        build(opts)  # a truncated file is still an error: nothing after the damage can be trusted to exist


def test_truncated_plain_file_loses_only_the_cut_record(tmp_path):
    path = _write(tmp_path, GOOD + GOOD.replace("P99901", "P99904")[:-40])
    e = _error(path)
    assert e.kind == "truncated_record"
    assert [r.accession for r in read_records(path, skip_bad=True)] == ["P99901"]


def test_empty_file(tmp_path):
    e = _error(_write(tmp_path, "", "empty.dat"))
    assert e.kind == "empty_file" and "empty" in str(e)


def test_csv_missing_column(tmp_path):
    p = _write(tmp_path, "accession,name,sequence\nP1,x,MKV\n", "t.csv")
    e = _error(p)
    assert e.kind == "missing_column" and "function" in str(e) and "['accession', 'name', 'sequence']" in str(e)
    assert "Function [CC]" in e.fix


def test_csv_ragged_row(tmp_path):
    p = _write(tmp_path, "accession,sequence,function\nP1,MKV,ok\nP2,MKV\n", "t.csv")
    e = _error(p)
    assert "line 3" in str(e)


def test_truncated_json(tmp_path, sample_records):
    from tests.data_tools.test_readers import _rest_json
    text = json.dumps(_rest_json(sample_records[:20]))
    p = tmp_path / "r.json"
    p.write_text(text[: len(text) // 2])
    e = _error(str(p))
    assert e.kind == "truncated_file" and "#" in str(e)


def test_fasta_without_annotations(tmp_path):
    p = _write(tmp_path, ">sp|P1|X Y\nMKV\n", "a.fasta")
    e = _error(p)
    assert "--annotations" in e.fix


def test_unknown_format(tmp_path):
    e = _error(_write(tmp_path, "hello\n", "x.bin"))
    assert "--format" in e.fix


def test_cli_reports_error_and_exit_code(tmp_path, capsys):
    p = _write(tmp_path, GOOD + CASES["non-amino-acid letter"][0])
    assert data_tools_main(["build", p, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "P99902" in err and "--skip-bad" in err


def test_huge_sequence_is_counted_not_lost(tmp_path):
    huge = "M" + "A" * 40000
    path = _write(tmp_path, GOOD + _entry(acc="P99905", seq=huge))
    opts = BuildOptions(inputs=[path], out=str(tmp_path / "o"), quiet=True, processes=1)
    opts.split.mode = "source"
    with pytest.raises(DataError):
        build(opts)
    rep = json.load(open(tmp_path / "o" / "work" / "records.done.json"))
    assert rep["dropped"] == {"too_long": 1} and rep["kept"] == 1
