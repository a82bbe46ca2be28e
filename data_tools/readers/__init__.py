"""Input formats. `chunks(path, fmt)` runs in the reading process; `parse(chunk, skip_bad)` in workers."""
from __future__ import annotations

import os
from typing import Iterator, Optional

from data_tools.readers import flatfile, rows
from data_tools.readers._io import open_binary
from data_tools.records import DataError

FORMATS = ("uniprot-flat", "uniprot-json", "uniprot-jsonl", "tsv", "csv", "fasta", "mol-instructions",
           "conversations", "alpaca")


def detect_format(path) -> str:
    name = os.path.basename(os.fspath(path)).lower()
    for ext in (".gz", ".bz2"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    if name.endswith((".fasta", ".fa", ".faa")):
        return "fasta"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".jsonl"):
        return "uniprot-jsonl"
    with open_binary(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"ID   "):
        return "uniprot-flat"
    if head.startswith(b">"):
        return "fasta"
    if head.startswith(b"{") and b'"results"' in head:
        return "uniprot-json"
    if head.startswith(b"[") and b'"instruction"' in head and b"Seq=<" in head:
        return "alpaca"          # ProLLaMA-style rows: the protein written as Seq=<...> in the input or output
    if head.startswith(b"[") and b'"instruction"' in head:
        return "mol-instructions"
    if head.startswith(b"[") and b'"conversations"' in head:
        return "conversations"
    raise DataError(path, "cannot tell the format from the name or first bytes", kind="usage",
                    fix=f"pass --format, one of {', '.join(FORMATS)}")


def chunks(path, fmt: Optional[str] = None, annotations: Optional[str] = None,
           sequence_only: bool = False) -> Iterator[tuple]:
    """sequence_only: the records need no function text (language-model data: FASTA without annotations)."""
    fmt = fmt or detect_format(path)
    if fmt == "uniprot-flat":
        return (("uniprot-flat", c) for c in flatfile.chunks(path))
    if fmt in ("uniprot-json", "uniprot-jsonl"):
        it = rows.uniprot_json_chunks(path, fmt)
    elif fmt in ("tsv", "csv"):
        it = rows.table_chunks(path, fmt)
    elif fmt == "fasta":
        it = rows.fasta_chunks(path, fmt, annotations, sequence_only)
    elif fmt in ("mol-instructions", "conversations", "alpaca"):
        it = rows.json_array_chunks(path, fmt)
    else:
        raise DataError(path, f"unknown format {fmt!r}", kind="usage", fix=f"use one of {', '.join(FORMATS)}")
    return (("rows", c) for c in it)


def parse(tagged_chunk, skip_bad: bool):
    kind, chunk = tagged_chunk
    return (flatfile.parse if kind == "uniprot-flat" else rows.parse)(chunk, skip_bad)


def read_records(path, fmt: Optional[str] = None, skip_bad: bool = False, annotations: Optional[str] = None):
    """Serial convenience: every record of a file (tests, small inputs)."""
    for c in chunks(path, fmt, annotations):
        recs, _ = parse(c, skip_bad)
        yield from recs
