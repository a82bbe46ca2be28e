"""`python -m data_tools superfamily-tasks`: ProLLaMA's superfamily instruction set from UniProt records.

Every protein with a family label gives the two Alpaca rows ProLLaMA tunes on:
    [Generate by superfamily]  Superfamily=<LABEL>   ->  Seq=<SEQUENCE>
    [Determine superfamily]    Seq=<SEQUENCE>        ->  Superfamily=<LABEL>
The label comes from --label: `supfam` (the SCOP superfamily names of the `DR   SUPFAM` lines, joined with ", "
as ProLLaMA joins several), `similarity` (the `SIMILARITY: Belongs to the ... family` comment), `interpro` or
`pfam` (their entry names). Rows also carry `accession` and `task` (ProLLaMA's loader ignores extra keys), so
`data_tools build --format alpaca` keeps them by protein and splits them by homology like any other data.
The input is streamed twice (labels are counted first, for --min-members); every record left out is counted.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from typing import Optional

from data_tools.readers import read_records
from data_tools.records import DataError

LABELS = ("supfam", "similarity", "interpro", "pfam")
TASKS = {"generate": ("[Generate by superfamily]", "generate_by_superfamily"),
         "determine": ("[Determine superfamily]", "determine_superfamily")}
_ECO = re.compile(r"\s*\{ECO:[^{}]*\}")
_BELONGS = re.compile(r"Belongs to the (.+?)(?:\.+(?:\s|$)|$)")


def label_of(record, source: str) -> Optional[str]:
    if source == "similarity":
        m = _BELONGS.search(_ECO.sub("", record.similarity).strip())
        return m.group(1).strip() if m else None
    db = {"supfam": "SUPFAM", "interpro": "InterPro", "pfam": "Pfam"}[source]
    names = [name for _, name in (record.xrefs or {}).get(db, []) if name]
    return ", ".join(dict.fromkeys(names)) or None


def rows_of(record, label: str, tasks):
    seq, lab = f"Seq=<{record.sequence}>", f"Superfamily=<{label}>"
    for t in tasks:
        instruction, task = TASKS[t]
        inp, out = (lab, seq) if t == "generate" else (seq, lab)
        yield {"instruction": instruction, "input": inp, "output": out, "accession": record.accession, "task": task}


def superfamily_tasks(inputs, out: str, label: str = "supfam", min_members: int = 1, min_length: int = 30,
                      max_length: int = 1024, tasks=("generate", "determine"), skip_bad: bool = False,
                      keep_unreviewed: bool = False, quiet: bool = False) -> dict:
    if label not in LABELS:
        raise DataError("--label", f"unknown label source {label!r}", kind="usage", fix=f"one of {', '.join(LABELS)}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise DataError("--tasks", f"unknown task(s) {sorted(unknown)}", kind="usage", fix=f"from {sorted(TASKS)}")

    def kept_records(drops: Optional[Counter]):
        for path in inputs:
            for r in read_records(path, skip_bad=skip_bad):
                why = ("unreviewed" if r.reviewed is False and not keep_unreviewed else
                       "too_short" if len(r.sequence) < min_length else
                       "too_long" if len(r.sequence) > max_length else None)
                lab = label_of(r, label) if why is None else None
                if why is None and lab is None:
                    why = f"no_{label}_label"
                if why is not None:
                    if drops is not None:
                        drops[why] += 1
                    continue
                yield r, lab

    counts = Counter(lab for _, lab in kept_records(None))
    drops, seen, proteins, written = Counter(), set(), 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write("[\n")
        for r, lab in kept_records(drops):
            if counts[lab] < min_members:
                drops["rare_label"] += 1
                continue
            if r.accession in seen:
                drops["duplicate_accession"] += 1
                continue
            seen.add(r.accession)
            proteins += 1
            for row in rows_of(r, lab, tasks):
                f.write((",\n" if written else "") + json.dumps(row, ensure_ascii=False))
                written += 1
        f.write("\n]\n")
    os.replace(out + ".tmp", out)
    labels = sum(1 for n in counts.values() if n >= min_members)
    report = {"out": os.path.abspath(out), "label": label, "proteins": proteins, "rows": written,
              "labels": labels, "dropped": dict(drops)}
    if not quiet:
        print(f"superfamily tasks: {proteins:,} proteins, {labels:,} labels ({label}), {written:,} rows -> {out}; "
              f"dropped: " + (", ".join(f"{k} {v:,}" for k, v in drops.most_common()) or "none"), file=sys.stderr)
    return report
