"""The record every reader yields, and the error every reader raises."""
from __future__ import annotations

import dataclasses
from typing import Optional

# ESM-2's alphabet accepts the 20 standard residues plus X (unknown), B/Z (ambiguous), U (selenocysteine)
# and O (pyrrolysine). Anything else cannot be tokenised without silently turning into <unk>.
AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")


class DataError(ValueError):
    """Bad input, located: which file, which record or line, what is wrong and what to do about it."""

    def __init__(self, path, what: str, *, record: Optional[str] = None, line: Optional[int] = None,
                 fix: str = "", kind: str = "malformed"):
        self.path, self.what, self.record, self.line, self.fix, self.kind = str(path), what, record, line, fix, kind
        where = self.path
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", record {record}"
        super().__init__(f"{where}: {what}" + (f" -- {fix}" if fix else ""))


@dataclasses.dataclass
class ProteinRecord:
    accession: str
    sequence: str
    function: str                       # raw function text as found (cleaning happens in clean.py)
    name: str = ""                      # protein full name
    organism: str = ""
    taxon_id: Optional[int] = None
    reviewed: Optional[bool] = None     # None: the format does not say
    source: str = ""                    # "path:line" of the record, for error messages and provenance
    task: str = ""                      # instruction data: the task name (e.g. general_function)
    instruction: str = ""               # instruction data: the question asked about the protein
    source_split: str = ""              # a split that came with the data (Mol-Instructions' metadata.split)
    conversations: Optional[list] = None  # multi-turn QA (Protein2Text style): [{"from": human|gpt, "value"}]
    input: str = ""                     # instruction data (Alpaca rows): the input beside the instruction
    representative: str = ""            # UniRef: the cluster's representative member (RepID)
    cluster_size: Optional[int] = None  # UniRef: members in the cluster (n=)
    # UniProt flat files: the SIMILARITY comment ("Belongs to the ... family.") and the family databases'
    # cross-references {InterPro|Pfam|SUPFAM: [[id, name], ...]}, what `data_tools superfamily-tasks` labels from;
    # not written into shards
    similarity: str = ""
    xrefs: Optional[dict] = None

    @property
    def key(self) -> str:
        """Identity for de-duplication: an accession, or accession + task for instruction data."""
        return f"{self.accession}/{self.task}" if self.task else self.accession


def check_sequence(seq: str, path, record: str, line: Optional[int] = None) -> str:
    """Upper-case, verify the alphabet; name the first bad letter and its position."""
    seq = seq.upper()
    if not seq:
        raise DataError(path, "empty sequence", record=record, line=line,
                        fix="remove the record or pass --skip-bad to count and skip it", kind="empty_sequence")
    bad = set(seq) - AMINO_ACIDS
    if bad:
        pos = next(i for i, c in enumerate(seq) if c in bad)
        raise DataError(path, f"non-amino-acid letter {seq[pos]!r} at residue {pos + 1} "
                        f"(allowed: {''.join(sorted(AMINO_ACIDS))})", record=record, line=line,
                        fix="fix the sequence or pass --skip-bad to count and skip such records",
                        kind="invalid_residues")
    return seq


def _rebuild_error(cls, path, what, record, line, fix, kind):
    return cls(path, what, record=record, line=line, fix=fix, kind=kind)


# Errors raised in worker processes must survive pickling back to the parent with all their fields.
DataError.__reduce__ = lambda self: (_rebuild_error, (type(self), self.path, self.what, self.record,
                                                      self.line, self.fix, self.kind))
