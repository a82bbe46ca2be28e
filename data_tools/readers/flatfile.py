"""UniProtKB flat-file ("text") format: uniprot_sprot.dat[.gz], the REST API's format=txt.

Chunking happens in the reading process (cheap: find the last '//' line in each block); parsing happens in
worker processes, so throughput scales with processes while the file is read once, sequentially.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterator, List, Tuple

from data_tools.readers._io import read_blocks
from data_tools.records import DataError, ProteinRecord, check_sequence

MAX_RECORD_BYTES = 64 << 20  # the largest real entry (titin) is ~0.5 MB; more means a missing '//' terminator
_TAXID = re.compile(r"NCBI_TaxID=(\d+)")
_SQ = re.compile(r"SQ   SEQUENCE\s+(\d+) AA;")
_NAME_TAIL = re.compile(r"\s*\{ECO:[^}]*\}")
FAMILY_DBS = ("InterPro", "Pfam", "SUPFAM")   # DR lines kept for family labels (`data_tools superfamily-tasks`)

Chunk = Tuple[str, int, bytes]  # (path, line number of the chunk's first line, complete entries)


def chunks(path, target_bytes: int = 4 << 20) -> Iterator[Chunk]:
    carry, line_no = b"", 1
    for block in read_blocks(path, target_bytes):
        data = carry + block
        cut = data.rfind(b"\n//\n")
        if cut < 0:
            if len(data) > MAX_RECORD_BYTES:
                raise DataError(path, f"no '//' record terminator in {len(data) >> 20} MiB after line {line_no}",
                                line=line_no, kind="malformed",
                                fix="this is not a UniProt flat file, or it is corrupt; check the --format")
            carry = data
            continue
        body, carry = data[:cut + 4], data[cut + 4:]
        yield str(path), line_no, body
        line_no += body.count(b"\n")
    if carry.strip():
        if carry.rstrip(b"\r\n").endswith(b"\n//"):
            carry = carry.rstrip(b"\r\n") + b"\n"
        yield str(path), line_no, carry  # parse() reports the missing terminator with the record's name


def parse(chunk: Chunk, skip_bad: bool) -> Tuple[List[ProteinRecord], Counter]:
    path, line_no, data = chunk
    text = data.decode("utf-8", errors="replace")
    records, bad = [], Counter()
    start = 0
    while start < len(text):
        end = text.find("\n//\n", start)
        terminated = end >= 0
        end = end + 1 if terminated else len(text)
        entry = text[start:end]
        first_line = line_no
        line_no += entry.count("\n") + (1 if terminated else 0)
        start = end + 3 if terminated else len(text)
        if not entry.strip():
            continue
        if not entry.startswith("ID   "):
            # Text that is not a record (concatenated downloads carry notes like this): count it as one bad
            # item and parse the entry that follows it, rather than losing that entry too.
            at = entry.find("\nID   ")
            junk_lines = entry[:at + 1].count("\n") if at >= 0 else 0
            err = DataError(path, f"{junk_lines or 'some'} line(s) of text that is not a UniProt record "
                            f"(starts {entry.strip()[:40]!r})", line=first_line,
                            fix="remove that text, or pass --skip-bad to count and skip it", kind="stray_text")
            if not skip_bad:
                raise err
            bad[err.kind] += 1
            if at < 0:
                continue
            entry, first_line = entry[at + 1:], first_line + junk_lines
        try:
            rec = _parse_entry(entry, path, first_line)
            if not terminated:
                raise DataError(path, "last record has no '//' terminator", record=rec.accession, line=first_line,
                                fix="the file is truncated: download it again", kind="truncated_record")
            records.append(rec)
        except DataError as e:
            if not skip_bad:
                raise
            bad[e.kind] += 1
    return records, bad


def _parse_entry(entry: str, path: str, line_no: int) -> ProteinRecord:
    lines = entry.split("\n")
    if not lines[0].startswith("ID   "):
        raise DataError(path, f"record does not start with an 'ID' line (found {lines[0][:40]!r})", line=line_no,
                        fix="is this a UniProt flat file? pick the right --format")
    idf = lines[0].split()
    reviewed = len(idf) > 2 and idf[2] == "Reviewed;"
    accessions: List[str] = []
    name = ""
    organism: List[str] = []
    taxon = None
    comments: List[List[str]] = []  # [topic line, continuation lines...]
    in_comments = True
    seq_lines: List[str] = []
    seq_len = None
    in_seq = False
    xrefs = {}
    for line in lines[1:]:
        if in_seq:
            if line.startswith("     "):
                seq_lines.append(line)
            continue
        code = line[:2]
        if code == "CC":
            if not in_comments:
                continue
            if line.startswith("CC   -!- "):
                comments.append([line[9:]])
            elif line.startswith("CC   ---"):
                in_comments = False  # the licence block follows
            elif comments:
                comments[-1].append(line[5:].strip())
        elif code == "AC":
            accessions.extend(a.strip() for a in line[5:].split(";") if a.strip())
        elif code == "DE":
            if not name:
                body = line[5:].strip()
                if body.startswith(("RecName: Full=", "SubName: Full=")):
                    name = _NAME_TAIL.sub("", body.split("Full=", 1)[1]).rstrip(";").strip()
        elif code == "OS":
            organism.append(line[5:].strip())
        elif code == "DR":
            db, _, rest = line[5:].partition(";")
            if db in FAMILY_DBS:   # `DR   SUPFAM; SSF48081; Methyl-coenzyme M reductase ... domain; 1.`
                fields = [f.strip() for f in rest.rstrip(".").split(";")]
                xrefs.setdefault(db, []).append([fields[0], fields[1] if len(fields) > 1 else ""])
        elif code == "OX" and taxon is None:
            m = _TAXID.search(line)
            taxon = int(m.group(1)) if m else None
        elif code == "SQ":
            m = _SQ.match(line)
            if not m:
                raise DataError(path, f"unreadable SQ line {line[:60]!r}", record=idf[1], line=line_no,
                                fix="the record is damaged; --skip-bad counts and skips it")
            seq_len, in_seq = int(m.group(1)), True
    record = accessions[0] if accessions else idf[1] if len(idf) > 1 else "?"
    if not accessions:
        raise DataError(path, "record has no AC (accession) line", record=record, line=line_no,
                        fix="the record is damaged; --skip-bad counts and skips it")
    if seq_len is None:
        raise DataError(path, "record has no SQ (sequence) block", record=record, line=line_no,
                        fix="the record is damaged or truncated; --skip-bad counts and skips it", kind="truncated_record")
    seq = "".join(seq_lines).replace(" ", "")
    if len(seq) != seq_len:
        raise DataError(path, f"sequence has {len(seq)} residues but its SQ line says {seq_len}", record=record,
                        line=line_no, fix="the record is damaged or truncated; --skip-bad counts and skips it",
                        kind="truncated_record" if len(seq) < seq_len else "malformed")
    seq = check_sequence(seq, path, record, line_no)
    functions = [_join_wrapped(c)[len("FUNCTION:"):].strip() for c in comments if c[0].startswith("FUNCTION:")]
    similarity = [_join_wrapped(c)[len("SIMILARITY:"):].strip() for c in comments if c[0].startswith("SIMILARITY:")]
    org = " ".join(organism).rstrip(".")
    return ProteinRecord(accession=record, sequence=seq, function=" ".join(functions), name=name, organism=org,
                         taxon_id=taxon, reviewed=reviewed, source=f"{path}:{line_no}",
                         similarity=" ".join(similarity), xrefs=xrefs or None)


def _join_wrapped(parts: List[str]) -> str:
    # UniProt wraps long words at hyphens ("2-" / "(methylthio)ethane"): no space belongs at such joins.
    out = parts[0].rstrip()
    for p in parts[1:]:
        out += p if out.endswith("-") and not out.endswith(" -") else " " + p
    return out
