"""Prot2Text-style cleaning and filtering. Every record that does not make it is counted under a reason."""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Dict, List, Optional, Tuple

from data_tools.records import DataError, ProteinRecord

_ECO = re.compile(r"\s*\{ECO:[^{}]*\}")
# A parenthesised group made only of citations: (PubMed:123), (PubMed:1, PubMed:2), (PubMed:1, Ref.3)
_CITES = re.compile(r"\s*\((?:\s*(?:PubMed:\d+|Ref\.\d+|DOI:[^,;()\s]+)\s*[,;]?)+\s*\)")
_SPACE = re.compile(r"\s+")
_SPACE_PUNCT = re.compile(r"\s+([.,;:])")
_DOUBLE_DOT = re.compile(r"\.(\s*\.)+")


@dataclasses.dataclass
class CleanOptions:
    min_length: int = 30
    max_length: int = 1024
    require_reviewed: bool = True
    require_function: bool = True
    # language-model data (a decoder-only recipe): the text of every sample is this format of the record, e.g.
    # ProLLaMA's "Seq=<{sequence}>"; function text is then neither needed nor kept. Fields: LM_FIELDS
    lm_text: Optional[str] = None


LM_FIELDS = ("sequence", "accession", "name", "organism", "taxon_id")


def check_lm_text(fmt: str) -> None:
    """A bad --lm-text fails before any input is read."""
    try:
        fmt.format_map({k: "" for k in LM_FIELDS})
    except (KeyError, IndexError, ValueError) as e:
        raise DataError("--lm-text", f"{fmt!r} is not a format of the fields {', '.join(LM_FIELDS)} ({e!r})",
                        kind="usage", fix="e.g. --lm-text 'Seq=<{sequence}>' (ProLLaMA's)") from None
    if "{sequence}" not in fmt:
        raise DataError("--lm-text", f"{fmt!r} does not write the sequence", kind="usage",
                        fix="include {sequence}, e.g. 'Seq=<{sequence}>'")


def clean_function_text(text: str) -> str:
    text = _ECO.sub("", text)
    text = _CITES.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    text = _SPACE_PUNCT.sub(r"\1", text)
    text = _DOUBLE_DOT.sub(".", text)
    return text.strip()


def clean(record: ProteinRecord, opts: CleanOptions) -> Tuple[Optional[ProteinRecord], str]:
    """(cleaned record, "") or (None, drop reason)."""
    if opts.require_reviewed and record.reviewed is False:
        return None, "unreviewed"
    if opts.lm_text is not None:
        n = len(record.sequence)
        if n < opts.min_length or n > opts.max_length:
            return None, "too_short" if n < opts.min_length else "too_long"
        fields = {k: getattr(record, k) or "" for k in LM_FIELDS}
        return dataclasses.replace(record, function=opts.lm_text.format_map(fields),
                                   name=_ECO.sub("", record.name).strip(), organism=record.organism.strip()), ""
    if opts.require_function and not record.function.strip():
        return None, "no_function"
    n = len(record.sequence)
    if n < opts.min_length:
        return None, "too_short"
    if n > opts.max_length:
        return None, "too_long"
    text = clean_function_text(record.function) if not record.task else _SPACE.sub(" ", record.function).strip()
    if opts.require_function and not text:
        return None, "function_empty_after_cleaning"
    name = _ECO.sub("", record.name).strip()
    return dataclasses.replace(record, function=text, name=name, organism=record.organism.strip()), ""


def clean_chunk(records: List[ProteinRecord], opts: CleanOptions) -> Tuple[List[ProteinRecord], Counter]:
    kept, dropped = [], Counter()
    for r in records:
        c, why = clean(r, opts)
        if c is None:
            dropped[why] += 1
        else:
            kept.append(c)
    return kept, dropped


def drop_table(read: int, dropped: Dict[str, int], bad: Dict[str, int], kept: int) -> str:
    rows = [f"  {'records read':<40}{read:>9,}"]
    rows += [f"  {'bad input: ' + k:<40}{v:>9,}   (--skip-bad)" for k, v in sorted(bad.items())]
    rows += [f"  {'dropped: ' + k:<40}{v:>9,}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])]
    rows.append(f"  {'kept':<40}{kept:>9,}")
    return "\n".join(rows)
