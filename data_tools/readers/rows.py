"""Row-shaped inputs: UniProt REST JSON / JSON Lines / TSV, Prot2Text CSV, FASTA + an annotation table,
and Mol-Instructions JSON. Each becomes chunks of raw rows that worker processes turn into records."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from data_tools.readers._io import iter_json_array, open_text
from data_tools.records import DataError, ProteinRecord, check_sequence

CHUNK_ROWS = 2000
# (format, path, index of the first row, rows); rows are dicts (JSON) or (line number, dict) pairs (tables)
Chunk = Tuple[str, str, int, list]

# Column names as UniProt's REST TSV export and Prot2Text's CSV files spell them.
COLUMNS = {
    "accession": ("Entry", "accession", "Accession", "AlphaFoldDB", "primaryAccession"),
    "sequence": ("Sequence", "sequence"),
    "function": ("Function [CC]", "function", "Function"),
    "name": ("Full Name", "Protein names", "protein_name", "name"),
    "organism": ("Organism", "organism", "organism_name"),
    "taxon_id": ("Organism (ID)", "taxon", "taxon_id", "organism_id"),
    "reviewed": ("Reviewed", "reviewed"),
}
REQUIRED = ("accession", "sequence", "function")
_ALT_NAMES = re.compile(r"(\s\([^()]*\))+$")


def _chunked(path, fmt, rows: Iterator) -> Iterator[Chunk]:
    buf, first = [], 0
    for i, row in enumerate(rows):
        if not buf:
            first = i
        buf.append(row)
        if len(buf) == CHUNK_ROWS:
            yield fmt, str(path), first, buf
            buf = []
    if buf:
        yield fmt, str(path), first, buf


# --- tables (UniProt TSV, Prot2Text CSV, annotation tables) ---------------------------------------------------

def resolve_columns(path, header: List[str], required=REQUIRED) -> Dict[str, str]:
    found = {}
    for role, names in COLUMNS.items():
        for n in names:
            if n in header:
                found[role] = n
                break
    missing = [r for r in required if r not in found]
    if missing:
        wanted = "; ".join(f"{r}: one of {', '.join(map(repr, COLUMNS[r]))}" for r in missing)
        raise DataError(path, f"missing column(s) {', '.join(missing)} -- the header has {header}", line=1,
                        fix=f"rename the column(s) ({wanted})", kind="missing_column")
    return found


def iter_table(path, delimiter: str, required=REQUIRED) -> Tuple[Dict[str, str], Iterator[Tuple[int, dict]]]:
    f = open_text(path)
    csv.field_size_limit(1 << 30)  # titin-sized sequences exceed the csv module's 128 KiB default
    reader = csv.DictReader(f, delimiter=delimiter)
    header = reader.fieldnames or []
    cols = resolve_columns(path, header, required)

    def rows():
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(path, f"row has {len(row) - (None in row) + len(row.get(None) or [])} fields, "
                                f"the header has {len(header)}", line=reader.line_num, kind="malformed",
                                fix="fix the quoting/delimiters of that line; --skip-bad cannot resync a broken table")
            yield reader.line_num, row
    return cols, rows()


def table_chunks(path, fmt: str) -> Iterator[Chunk]:
    cols, rows = iter_table(path, "\t" if fmt == "tsv" else ",")
    for c in _chunked(path, fmt, rows):
        yield c[0], c[1], c[2], [(line, {role: row[col] for role, col in cols.items()}) for line, row in c[3]]


def _table_record(path, line: int, row: dict) -> ProteinRecord:
    acc = (row.get("accession") or "").strip()
    if not acc:
        raise DataError(path, "empty accession", line=line, fix="fill it in or drop the row")
    taxon = (row.get("taxon_id") or "").strip()
    reviewed = (row.get("reviewed") or "").strip().lower()
    return ProteinRecord(
        accession=acc, sequence=check_sequence((row.get("sequence") or "").strip(), path, acc, line),
        function=(row.get("function") or "").strip(), name=_ALT_NAMES.sub("", (row.get("name") or "").strip()),
        organism=(row.get("organism") or "").strip(), taxon_id=int(taxon) if taxon.isdigit() else None,
        reviewed={"reviewed": True, "unreviewed": False}.get(reviewed), source=f"{path}:{line}")


# --- UniProt REST JSON ---------------------------------------------------------------------------------------

def uniprot_json_chunks(path, fmt: str) -> Iterator[Chunk]:
    if fmt == "uniprot-jsonl":
        def lines():
            for i, line in enumerate(open_text(path), 1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(path, f"invalid JSON: {e.msg}", line=i, kind="malformed",
                                        fix="the file is truncated or corrupt: export it again") from None
        return _chunked(path, fmt, lines())
    return _chunked(path, fmt, iter_json_array(path, key="results"))


def _uniprot_json_record(path, index: int, entry: dict) -> ProteinRecord:
    acc = entry.get("primaryAccession")
    if not acc or "sequence" not in entry:
        raise DataError(path, "entry lacks primaryAccession or sequence", record=f"#{index}",
                        fix="export with the accession and sequence fields")
    desc = entry.get("proteinDescription", {})
    name_block = desc.get("recommendedName") or (desc.get("submissionNames") or [{}])[0]
    texts = [t.get("value", "") for c in entry.get("comments", []) if c.get("commentType") == "FUNCTION"
             for t in c.get("texts", [])]
    org = entry.get("organism", {})
    return ProteinRecord(
        accession=acc, sequence=check_sequence(entry["sequence"].get("value", ""), path, acc),
        function=" ".join(texts), name=name_block.get("fullName", {}).get("value", ""),
        organism=org.get("scientificName", ""), taxon_id=org.get("taxonId"),
        reviewed="Swiss-Prot" in entry.get("entryType", "") if "entryType" in entry else None,
        source=f"{path}#{index}")


# --- Mol-Instructions (protein-oriented) JSON -----------------------------------------------------------------

_FENCE = re.compile(r"```\s*([A-Za-z\s]*?)\s*```", re.S)


def json_array_chunks(path, fmt: str) -> Iterator[Chunk]:
    """A JSON array of row objects (Mol-Instructions, Protein2Text-style conversations), streamed."""
    return _chunked(path, fmt, iter_json_array(path))


def _mol_instructions_record(path, index: int, row: dict) -> ProteinRecord:
    missing = [k for k in ("instruction", "input", "output") if k not in row]
    if missing:
        raise DataError(path, f"object lacks {missing}", record=f"#{index}", kind="malformed",
                        fix="Mol-Instructions rows have instruction/input/output/metadata")
    meta = row.get("metadata") or {}
    acc = meta.get("protein_accession") or f"row{index}"
    m = _FENCE.search(row["input"])
    seq = re.sub(r"\s+", "", m.group(1) if m else row["input"])
    task = meta.get("task") or "instruction"
    return ProteinRecord(accession=acc, sequence=check_sequence(seq, path, f"#{index} ({acc})"),
                         function=row["output"], instruction=row["instruction"].strip(), task=task,
                         reviewed=True, source_split=meta.get("split", ""), source=f"{path}#{index}")


# --- Alpaca rows with proteins as text (ProLLaMA) ---------------------------------------------------------------

_SEQ_TEXT = re.compile(r"Seq=<([A-Za-z]*)>?")
_TAG = re.compile(r"^\[([^\]]+)\]")


def _alpaca_record(path, index: int, row: dict) -> ProteinRecord:
    missing = [k for k in ("instruction", "input", "output") if not isinstance(row.get(k), str)]
    if missing:
        raise DataError(path, f"object lacks string field(s) {missing}", record=f"#{index}", kind="malformed",
                        fix='Alpaca rows are {"instruction": ..., "input": ..., "output": ...}')
    acc = str(row.get("accession") or row.get("id") or f"row{index}")
    # the protein the row is about: written out by a generation task, read by an understanding task
    m = _SEQ_TEXT.search(row["output"]) or _SEQ_TEXT.search(row["input"])
    if not m or not m.group(1):
        raise DataError(path, "no protein written as Seq=<...> in the output or the input", record=f"#{index} ({acc})",
                        kind="malformed", fix="ProLLaMA-style rows write the protein as Seq=<MKV...>")
    tag = _TAG.match(row["instruction"].strip())
    task = str(row.get("task") or (re.sub(r"\W+", "_", tag.group(1).strip().lower()) if tag else "instruction"))
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return ProteinRecord(accession=acc, sequence=check_sequence(m.group(1), path, f"#{index} ({acc})"),
                         function=row["output"].strip(), instruction=row["instruction"].strip(),
                         input=row["input"].strip(), task=task, reviewed=True,
                         source_split=str(meta.get("split") or row.get("split") or ""), source=f"{path}#{index}")


# --- Protein2Text-style multi-turn QA JSON ----------------------------------------------------------------------

def _conversations_record(path, index: int, row: dict) -> ProteinRecord:
    acc = str(row.get("accession") or row.get("id") or f"row{index}")
    seq = row.get("sequence") or row.get("protein") or row.get("seq")
    turns = row.get("conversations")
    if not seq or not isinstance(turns, list) or not turns:
        raise DataError(path, "object needs a sequence ('sequence'/'protein') and a non-empty 'conversations' list",
                        record=f"#{index} ({acc})", kind="malformed",
                        fix='rows look like {"id": ..., "protein": "MKT...", "conversations": [{"from": "human", '
                            '"value": "..."}, {"from": "gpt", "value": "..."}]}')
    answers = [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")]
    if not answers:
        raise DataError(path, "conversation without an answer turn ('from': 'gpt')", record=f"#{index} ({acc})",
                        kind="malformed", fix="each conversation needs at least one gpt/assistant turn")
    return ProteinRecord(accession=acc, sequence=check_sequence(seq, path, f"#{index} ({acc})"),
                         function=answers[0], task=str(row.get("task") or "qa"), reviewed=True,
                         conversations=[{"from": t.get("from"), "value": t.get("value", "")} for t in turns],
                         source=f"{path}#{index}")


# --- FASTA (+ a table with the function texts) ----------------------------------------------------------------

_LINE_BREAK = re.compile(r"[ \t]*\r?\n[ \t]*")   # a line end with the spaces around it: per-line strip


def iter_fasta(path) -> Iterator[Tuple[int, str, str]]:
    """(line of the header, header, sequence), streamed. Whole blocks of records at a time (a Python step per
    line costs more than reading UniRef from disk): records are cut at newline-'>' and each sequence's lines
    joined, stripping every line as a per-line reader would (a space inside a line stays, and the residue check
    names it)."""
    f = open_text(path)
    line, pending, started, eof = 1, "", False, False
    while not eof:
        chunk = f.read(4 << 20)
        eof = not chunk
        pending += chunk
        if not started:
            at = pending.find(">")
            head = pending if at < 0 else pending[:at]
            if head.strip():
                bad = len(head) - len(head.lstrip())
                raise DataError(path, "sequence data before the first '>' header", line=line + head[:bad].count("\n"),
                                fix="is this a FASTA file? pick the right --format", kind="malformed")
            if at < 0:
                line, pending = line + pending.count("\n"), ""
                continue
            line, pending, started = line + head.count("\n"), pending[at:], True
        cut = len(pending) if eof else pending.rfind("\n>") + 1    # complete records: up to the last header
        if cut <= 0:
            continue
        block, pending = pending[:cut], pending[cut:]
        pieces = block[1:].split("\n>")
        for k, piece in enumerate(pieces):
            header, _, body = piece.partition("\n")
            # the regex only where a line could carry spaces or a carriage return; most FASTA has neither
            seq = _LINE_BREAK.sub("", body) if " " in body or "\t" in body or "\r" in body else body.replace("\n", "")
            yield line, header.strip(), seq.strip()
            line += piece.count("\n") + (k < len(pieces) - 1)
    if not started:
        raise DataError(path, "no FASTA records ('>' headers) found", fix="check the file and --format",
                        kind="malformed")


_OS = re.compile(r" OS=(.*?)(?= [A-Z]{2}=|$)")
_OX = re.compile(r" OX=(\d+)")
# UniRef50/90/100: `UniRef50_Q6GZX4 Putative transcription factor 001R n=2 Tax=Frog virus 3 TaxID=10493
# RepID=001R_FRG3G`; the fields come in this order, Tax= may hold spaces, and any of them may be missing
_UNIREF_FIELDS = ("RepID", "TaxID", "Tax", "n")      # cut from the right, so a name may hold " n=" itself


def parse_uniref_header(header: str) -> dict:
    first, _, rest = header.partition(" ")
    rest, fields = " " + rest, {}
    for key in _UNIREF_FIELDS:
        at = rest.rfind(f" {key}=")
        if at >= 0:
            fields[key], rest = rest[at + len(key) + 2:], rest[:at]
    out = {"accession": first, "reviewed": None, "name": rest.strip()}
    if fields.get("Tax"):
        out["organism"] = fields["Tax"].strip()
    for key, field in (("taxon_id", "TaxID"), ("cluster_size", "n")):
        if fields.get(field, "").strip().isdigit():
            out[key] = int(fields[field])
    if fields.get("RepID"):
        out["representative"] = fields["RepID"].strip()
    return out


def parse_fasta_header(header: str) -> dict:
    """UniProt headers (`sp|P12345|NAME_HUMAN Full name OS=... OX=...`), UniRef cluster headers, or a bare
    accession."""
    if header.startswith("UniRef"):
        return parse_uniref_header(header)
    first = header.split()[0]
    parts = first.split("|")
    out = {"accession": parts[1] if len(parts) >= 3 else first, "reviewed": None}
    if len(parts) >= 3:
        out["reviewed"] = parts[0] == "sp"
        rest = header[len(first):]
        out["name"] = re.split(r" [A-Z]{2}=", rest, maxsplit=1)[0].strip()
        if m := _OS.search(rest):
            out["organism"] = m.group(1)
        if m := _OX.search(rest):
            out["taxon_id"] = int(m.group(1))
    return out


def fasta_chunks(path, fmt: str, annotations: Optional[str], sequence_only: bool = False) -> Iterator[Chunk]:
    """sequence_only: records without function text (language-model data, `build --lm-text`); an annotation
    table, when given, still adds its function texts."""
    if not annotations and sequence_only:
        return _chunked(path, fmt, ((line, {**parse_fasta_header(header), "sequence": seq, "annotation": None,
                                             "header": header}) for line, header, seq in iter_fasta(path)))
    if not annotations:
        raise DataError(path, "FASTA carries no function text", kind="usage",
                        fix="pass --annotations TABLE.tsv|csv with accession and function columns, or --lm-text "
                            "FORMAT to build language-model text from the sequences alone")
    delim = "\t" if annotations.endswith((".tsv", ".tsv.gz")) else ","
    cols, rows = iter_table(annotations, delim, required=("accession", "function"))
    table = {}
    for line, row in rows:
        table[row[cols["accession"]].strip()] = {role: row[c] for role, c in cols.items()}

    def joined():
        for line, header, seq in iter_fasta(path):
            info = parse_fasta_header(header)
            ann = table.get(info["accession"])
            yield line, {**info, "sequence": seq, "annotation": ann, "header": header}
    return _chunked(path, fmt, joined())


def _fasta_record(path, line: int, row: dict) -> ProteinRecord:
    ann = row["annotation"] or {}
    acc = row["accession"]
    return ProteinRecord(accession=acc, sequence=check_sequence(row["sequence"], path, acc, line),
                         function=(ann.get("function") or "").strip(),
                         name=row.get("name") or _ALT_NAMES.sub("", (ann.get("name") or "").strip()),
                         organism=row.get("organism") or (ann.get("organism") or ""),
                         taxon_id=row.get("taxon_id"), reviewed=row["reviewed"], source=f"{path}:{line}",
                         representative=row.get("representative", ""), cluster_size=row.get("cluster_size"))


# --- worker side ----------------------------------------------------------------------------------------------

# Every row travels as (line number or object index, dict).
_BUILDERS: Dict[str, Callable[[str, int, dict], ProteinRecord]] = {
    "uniprot-json": _uniprot_json_record, "uniprot-jsonl": _uniprot_json_record,
    "tsv": _table_record, "csv": _table_record,
    "mol-instructions": _mol_instructions_record, "fasta": _fasta_record,
    "conversations": _conversations_record, "alpaca": _alpaca_record,
}


def parse(chunk: Chunk, skip_bad: bool) -> Tuple[List[ProteinRecord], Counter]:
    fmt, path, _, rows = chunk
    build = _BUILDERS[fmt]
    records, bad = [], Counter()
    for pos, row in rows:
        try:
            records.append(build(path, pos, row))
        except DataError as e:
            if not skip_bad:
                raise
            bad[e.kind] += 1
    return records, bad
