"""3D structures for the structure-aware encoder: one C-alpha position per residue of a record's sequence.

Parser: gemmi (maintained by CCP4/Global Phasing; a C++ core). It reads PDB and mmCIF alike, gzipped or not and
from bytes (members of a tar), builds the entity SEQRES of either format, keeps the first alternate location on
request, knows every modified residue's parent (MSE -> M) from the CCD table it ships, and aligns a sequence to
a chain's observed residues with gap penalties that follow the residue numbering (a numbering jump is a likely
gap). Biopython parses in pure Python (bench/bench_structure.py: gemmi with alignment and checks reads 3.1x the
AlphaFold-style files per second that Biopython parses alone, 15x on the gzipped PDB/mmCIF sample) and has no
sequence-to-model alignment.

What is read: the first model; the polymer chain named for the record (a `--structure-map` row), else the
chain whose observed residues align best. The record's sequence is aligned to the chain's observed residues
(`gemmi.align_sequence_to_polymer`); every matched residue gets its CA position, every other residue is
marked missing (never interpolated). pLDDT (the B-factor column of AlphaFold DB models) is kept when the file is
an AlphaFold model.

Files are found by accession: `{ACC}.pdb|.cif|.ent|.mmcif[.gz]`, AlphaFold DB's `AF-{ACC}-F1-model_v{N}.*`
(fragment 1: the whole protein up to 2,700 residues), in a directory (searched recursively) or a tar, or from
a map file of `accession<TAB>path[<TAB>chain]` rows (paths relative to the map's folder).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import tarfile
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from data_tools.records import DataError

MIN_IDENTITY = 0.9            # of the chain's aligned residues, identical to the record's
MAX_COORD = 9999.0            # PDB's columns hold -999.999..9999.999; beyond that a file is broken
MIN_CA_DISTANCE = 0.5         # two C-alpha atoms closer than this (angstrom): collapsed or duplicated coordinates
_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
_AF_NAME = re.compile(r"^AF-(?P<acc>[A-Za-z0-9_-]+?)-F(?P<frag>\d+)-model_v\d+$")


@dataclasses.dataclass
class Structure:
    """Per residue of the record's sequence: coords [L, 3] float32 (0 where missing), mask [L] bool,
    plddt [L] float32 (NaN where missing) or None."""
    coords: np.ndarray
    mask: np.ndarray
    plddt: Optional[np.ndarray]
    chain: str
    identity: float           # identical / aligned residues
    path: str

    @property
    def coverage(self) -> float:
        return float(self.mask.mean()) if len(self.mask) else 0.0


def _stem(name: str) -> str:
    base = os.path.basename(name)
    for ext in (".gz",) + _SUFFIXES:
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base


def _accession_of(name: str) -> Optional[str]:
    low = os.path.basename(name).lower()
    if not any(low.endswith(s) or low.endswith(s + ".gz") for s in _SUFFIXES):
        return None
    stem = _stem(name)
    m = _AF_NAME.match(stem)
    if m:
        return m["acc"].upper() if m["frag"] == "1" else None
    return stem.upper()


class StructureSource:
    """Accession -> (bytes of its structure file, where they came from, chain or None)."""

    def __init__(self, path: str, map_file: Optional[str] = None):
        self.path, self.map_file = path, map_file
        self.index: Dict[str, Tuple[str, Optional[str]]] = {}
        self._tar = None
        if map_file:
            self._read_map(map_file)
        elif os.path.isdir(path):
            for root, _, files in os.walk(path):
                for f in sorted(files):
                    acc = _accession_of(f)
                    if acc:
                        self._add(acc, os.path.join(root, f))
        elif os.path.isfile(path) and tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                for m in tar:
                    acc = _accession_of(m.name) if m.isfile() else None
                    if acc:
                        self._add(acc, m.name)
        else:
            raise DataError(path, "not a directory of structure files, a tar of them, or found at all",
                            kind="missing_file", fix="pass --structures DIR|FILE.tar, or --structure-map TSV")

    def _add(self, acc: str, where: str, chain: Optional[str] = None) -> None:
        if acc in self.index and self.index[acc][0] != where:
            raise DataError(where, f"a second structure file for accession {acc} (first: {self.index[acc][0]})",
                            kind="usage", fix="keep one file per accession, or name the one to use in "
                                              "--structure-map")
        self.index[acc] = (where, chain)

    def _read_map(self, map_file: str) -> None:
        base = os.path.dirname(os.path.abspath(map_file))
        with open(map_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                cols = line.rstrip("\n").split("\t")
                if len(cols) not in (2, 3):
                    raise DataError(map_file, "expected accession<TAB>path[<TAB>chain]", line=n, kind="usage",
                                    fix="one row per accession, tab-separated")
                self._add(cols[0].strip(), os.path.join(base, cols[1].strip()),
                          cols[2].strip() if len(cols) == 3 and cols[2].strip() else None)

    def find(self, accession: str) -> Optional[Tuple[bytes, str, Optional[str]]]:
        hit = self.index.get(accession) or self.index.get(accession.upper())
        if hit is None:
            return None
        where, chain = hit
        if self.map_file or os.path.isdir(self.path):
            if not os.path.exists(where):
                raise DataError(where, f"structure file for {accession} not found", record=accession,
                                kind="missing_file", fix="fix the path in --structure-map")
            with open(where, "rb") as f:
                return f.read(), where, chain
        if self._tar is None:
            self._tar = tarfile.open(self.path)
        return self._tar.extractfile(where).read(), f"{self.path}:{where}", chain


def _text(data: bytes, where: str, accession: str) -> str:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            raise DataError(where, f"compressed structure ends early or is corrupt ({e})", record=accession,
                            kind="truncated_structure", fix="download the file again (`gzip -t` checks it)") from None
    if not data.strip():
        raise DataError(where, "empty structure file", record=accession, kind="truncated_structure",
                        fix="download the file again")
    return data.decode("utf-8", errors="replace")


def parse_structure(data: bytes, where: str, accession: str = ""):
    """gemmi.Structure from the bytes of a PDB or mmCIF file (gzipped or not)."""
    import gemmi
    text = _text(data, where, accession)
    try:
        if text.lstrip().startswith("data_"):
            st = gemmi.make_structure_from_block(gemmi.cif.read_string(text).sole_block())
        else:
            last = [ln for ln in text.splitlines() if ln.strip()][-1]
            if not last.startswith(("END", "MASTER", "CONECT", "TER")) or _cut_atom_line(text):
                raise DataError(where, "the PDB file ends without an END record (cut short?)", record=accession,
                                kind="truncated_structure", fix="download the file again")
            st = gemmi.read_pdb_string(text)
    except DataError:
        raise
    except Exception as e:  # gemmi reports syntax errors as RuntimeError/ValueError with the line
        raise DataError(where, f"cannot parse the structure ({e})", record=accession, kind="malformed_structure",
                        fix="check the file; --skip-bad counts it and keeps the record sequence-only") from None
    if len(st) == 0:
        raise DataError(where, "no model with atoms", record=accession, kind="malformed_structure",
                        fix="check the file")
    st.setup_entities()
    st.remove_alternative_conformations()   # the first alternate location of every atom
    return st


def _cut_atom_line(text: str) -> bool:
    """A coordinate line shorter than its coordinates: the file was cut inside it."""
    return any(ln.startswith(("ATOM  ", "HETATM")) and len(ln.rstrip()) < 54 for ln in text.splitlines()[-50:])


def _is_alphafold(st, where: str) -> bool:
    title = " ".join(str(v) for k, v in st.info.items() if "title" in k.lower())
    return "alphafold" in title.lower() or bool(_AF_NAME.match(_stem(where.split(":")[-1])))


def residue_letter(name: str) -> str:
    """One-letter code of a residue name; a modified residue gives its parent's (MSE -> M), unknown X."""
    import gemmi
    info = gemmi.find_tabulated_residue(name)
    if info is None or not info.is_amino_acid():
        return "X"
    c = info.one_letter_code.upper()
    return c if c.strip() and c != "?" else "X"


def _align(sequence: str, polymer):
    """[(sequence index, residue)] of the aligned identical-or-not pairs and the identity among them."""
    import gemmi
    res = list(polymer)
    # align on parent residue names, so a selenomethionine matches the record's M
    names = [gemmi.expand_one_letter(residue_letter(r.name), gemmi.ResidueKind.AA) or "UNK" for r in res]
    saved = [r.name for r in res]
    for r, n in zip(res, names):
        r.name = n
    try:
        query = gemmi.expand_one_letter_sequence(sequence, gemmi.ResidueKind.AA)
        al = gemmi.align_sequence_to_polymer(query, polymer, gemmi.PolymerType.PeptideL, gemmi.AlignmentScoring())
    finally:
        for r, n in zip(res, saved):
            r.name = n
    pairs, i, j, same = [], 0, 0, 0
    for n, op in re.findall(r"(\d+)([MID])", al.cigar_str()):
        n = int(n)
        if op == "M":
            for _ in range(n):
                pairs.append((i, res[j]))
                same += sequence[i] == residue_letter(res[j].name)
                i, j = i + 1, j + 1
        elif op == "I":
            i += n            # record residues the chain does not have
        else:
            j += n            # observed residues not in the record (tags, linkers): not aligned
    return pairs, same / max(1, len(pairs)), len(res)


def read_structure(data: bytes, where: str, accession: str, sequence: str, chain: Optional[str] = None,
                   min_identity: float = MIN_IDENTITY) -> Structure:
    st = parse_structure(data, where, accession)
    model = st[0]
    chains = protein_chains(model)
    if chain is not None:
        chains = [ch for ch in chains if ch.name == chain]
        if not chains:
            names = ", ".join(dict.fromkeys(c.name for c in model))
            raise DataError(where, f"no protein chain {chain!r} (chains: {names})",
                            record=accession, kind="missing_chain", fix="fix the chain in --structure-map")
    if not chains:
        raise DataError(where, "no protein chain in the first model", record=accession, kind="missing_chain",
                        fix="check the file, or leave the record without a structure")
    best = None
    for ch in chains:
        pairs, ident, observed = _align(sequence, ch.get_polymer())
        score = ident * len(pairs)
        if best is None or score > best[0]:
            best = (score, ch.name, pairs, ident, observed)
    _, name, pairs, ident, observed = best
    if ident < min_identity or not pairs:
        raise DataError(where, f"chain {name}'s residues match the record's sequence at {ident:.0%} identity over "
                               f"{len(pairs)} aligned of {observed} observed residues (need {min_identity:.0%})",
                        record=accession, kind="sequence_mismatch",
                        fix="the structure is of another protein or isoform: fix the file or map, lower "
                            "--structure-min-identity, or --skip-bad to count it and keep the record sequence-only")
    L = len(sequence)
    coords = np.zeros((L, 3), dtype=np.float32)
    mask = np.zeros(L, dtype=bool)
    plddt = np.full(L, np.nan, dtype=np.float32) if _is_alphafold(st, where) else None
    for i, r in pairs:
        ca = r.find_atom("CA", "*")
        if ca is None:
            continue
        coords[i] = (ca.pos.x, ca.pos.y, ca.pos.z)
        mask[i] = True
        if plddt is not None:
            plddt[i] = ca.b_iso
    check_coordinates(coords, mask, plddt, where, accession)
    return Structure(coords, mask, plddt, name, ident, where)


def protein_chains(model) -> list:
    """The chains of a gemmi model whose polymer is a peptide (DNA/RNA chains and ligand-only chains left out)."""
    import gemmi
    peptide = (gemmi.PolymerType.PeptideL, gemmi.PolymerType.PeptideD, gemmi.PolymerType.Unknown)
    return [ch for ch in model if len(ch.get_polymer()) and ch.get_polymer().check_polymer_type() in peptide]


def seqres_chains(st) -> list:
    """(chain name, SEQRES one-letter sequence) of every protein chain of model 1 whose entity has a SEQRES."""
    out = []
    for ch in protein_chains(st[0]):
        ent = st.get_entity_of(ch.get_polymer())
        if ent is not None and ent.full_sequence:
            out.append((ch.name, "".join(residue_letter(x.split(",")[0]) for x in ent.full_sequence)))
    return out


def check_coordinates(coords, mask, plddt, where: str, accession: str) -> None:
    xyz = coords[mask]
    if not np.isfinite(xyz).all():
        raise DataError(where, "non-finite (NaN/inf) coordinates", record=accession, kind="bad_coordinates",
                        fix="the file is damaged: download it again, or --skip-bad")
    if len(xyz) and np.abs(xyz).max() > MAX_COORD:
        raise DataError(where, f"coordinate {np.abs(xyz).max():.0f} A is beyond any structure", record=accession,
                        kind="bad_coordinates", fix="the file is damaged: download it again, or --skip-bad")
    if len(xyz) > 1:
        d = np.linalg.norm(np.diff(xyz, axis=0), axis=1)
        if d.min() < MIN_CA_DISTANCE:
            k = int(np.flatnonzero(mask)[int(d.argmin())])
            raise DataError(where, f"C-alpha atoms of residues {k + 1} and the next observed one are {d.min():.2f} A "
                                   f"apart (collapsed or duplicated coordinates)", record=accession,
                            kind="bad_coordinates", fix="check the file, or --skip-bad")
    if plddt is not None and len(xyz) and not ((plddt[mask] >= 0) & (plddt[mask] <= 100)).all():
        raise DataError(where, "pLDDT outside 0..100 in an AlphaFold model", record=accession,
                        kind="bad_coordinates", fix="check the file, or --skip-bad")


def sample_members(key: str, s: Structure):
    """Shard members of one record's structure (shards.py adds them beside KEY.seq)."""
    out = [(f"{key}.coords.npy", _npy(s.coords)), (f"{key}.coords_mask.npy", _npy(s.mask))]
    if s.plddt is not None:
        out.append((f"{key}.plddt.npy", _npy(s.plddt)))
    return out


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
