"""python -m data_tools {build,verify,fetch-uniprot,superfamily-tasks}"""
from __future__ import annotations

import argparse
import json
import sys

from data_tools.build import BuildOptions, build
from data_tools.clean import CleanOptions
from data_tools.readers import FORMATS
from data_tools.records import DataError
from data_tools.split import SplitOptions


def _fractions(s: str):
    parts = tuple(float(x) for x in s.split(","))
    if len(parts) != 3 or abs(sum(parts) - 1) > 1e-6 or min(parts) < 0:
        raise argparse.ArgumentTypeError("three non-negative numbers summing to 1, e.g. 0.9,0.05,0.05")
    return parts


def _split_list(s: str):
    split, _, path = s.partition("=")
    if not path:
        raise argparse.ArgumentTypeError("SPLIT=FILE, e.g. test=test_accessions.txt")
    return split, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="input files -> cleaned, split WebDataset shards + manifest.json")
    b.add_argument("inputs", nargs="+", help="uniprot_sprot.dat[.gz], REST .json/.jsonl/.tsv, .csv, .fasta, "
                                             "Mol-Instructions .json")
    b.add_argument("--out", required=True, help="output directory (manifest.json, shards/, work/)")
    b.add_argument("--format", choices=FORMATS, help="input format (default: from the name / first bytes)")
    b.add_argument("--annotations", help="for FASTA input: a CSV/TSV with accession and function columns")
    b.add_argument("--skip-bad", action="store_true", help="count and skip malformed records instead of failing")
    b.add_argument("--min-length", type=int, default=30)
    b.add_argument("--max-length", type=int, default=1024)
    b.add_argument("--keep-unreviewed", action="store_true", help="keep TrEMBL (unreviewed) entries")
    b.add_argument("--lm-text", metavar="FORMAT", help="language-model data for a decoder-only recipe: each "
                   "sample's text is FORMAT of its record, e.g. ProLLaMA's 'Seq=<{sequence}>' (fields: sequence, "
                   "accession, name, organism, taxon_id); no function text needed (UniRef FASTA)")
    b.add_argument("--split", choices=("mmseqs", "lists", "source"), default="mmseqs",
                   help="mmseqs: cluster and assign whole clusters; lists: --split-list files; "
                        "source: the split stored in the data (Mol-Instructions)")
    b.add_argument("--min-seq-id", type=float, default=0.3)
    b.add_argument("--coverage", type=float, default=0.5)
    b.add_argument("--fractions", type=_fractions, default=(0.9, 0.05, 0.05), help="train,valid,test")
    b.add_argument("--split-list", type=_split_list, action="append", default=[], metavar="SPLIT=FILE")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shard-size-mb", type=float, default=32.0)
    b.add_argument("--samples-per-shard", type=int)
    b.add_argument("--processes", type=int, default=None, help="worker processes (default: all cores)")
    b.add_argument("--structures", metavar="DIR|TAR", help="3D structures for the structure-aware encoder: PDB/mmCIF/"
                   "AlphaFold DB files named by accession (ACC.pdb.gz, AF-ACC-F1-model_v4.cif, ...), in a directory "
                   "or a tar; shards gain KEY.coords.npy + KEY.coords_mask.npy (+ KEY.plddt.npy)")
    b.add_argument("--structure-map", metavar="TSV", help="accession<TAB>path[<TAB>chain] rows instead of names")
    b.add_argument("--structure-min-identity", type=float, default=0.9,
                   help="a structure's aligned residues must match the record's sequence this well")
    b.add_argument("--overwrite", action="store_true", help="delete an existing --out first")
    b.add_argument("--quiet", action="store_true")

    v = sub.add_parser("verify", help="re-hash and count every shard against manifest.json")
    v.add_argument("manifest")

    t = sub.add_parser("superfamily-tasks", help="ProLLaMA's instruction set from UniProt records: Alpaca JSON "
                                                 "rows [Generate by superfamily] / [Determine superfamily]")
    t.add_argument("inputs", nargs="+", help="UniProt flat files (uniprot_sprot.dat[.gz]) or other record inputs")
    t.add_argument("--out", required=True, help="the Alpaca JSON to write (then: build --format alpaca)")
    t.add_argument("--label", choices=("supfam", "similarity", "interpro", "pfam"), default="supfam",
                   help="supfam: SCOP superfamily names (DR SUPFAM); similarity: 'Belongs to the ... family'")
    t.add_argument("--tasks", default="generate,determine", help="comma-separated: generate, determine")
    t.add_argument("--min-members", type=int, default=1, help="leave out labels with fewer proteins (counted)")
    t.add_argument("--min-length", type=int, default=30)
    t.add_argument("--max-length", type=int, default=1024)
    t.add_argument("--keep-unreviewed", action="store_true")
    t.add_argument("--skip-bad", action="store_true")

    f = sub.add_parser("fetch-uniprot", help="download a slice of reviewed UniProtKB (flat file) from the REST API")
    f.add_argument("--out", required=True, help="e.g. data/uniprot_slice.dat.gz")
    f.add_argument("--limit", type=int, default=2000)
    f.add_argument("--query", default=None)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "build":
            opts = BuildOptions(
                inputs=args.inputs, out=args.out, format=args.format, annotations=args.annotations,
                skip_bad=args.skip_bad,
                clean=CleanOptions(min_length=args.min_length, max_length=args.max_length,
                                   require_reviewed=not args.keep_unreviewed, lm_text=args.lm_text),
                split=SplitOptions(mode=args.split, min_seq_id=args.min_seq_id, coverage=args.coverage,
                                   fractions=args.fractions, seed=args.seed, lists=dict(args.split_list) or None),
                shard_size_mb=args.shard_size_mb, samples_per_shard=args.samples_per_shard, quiet=args.quiet,
                structures=args.structures, structure_map=args.structure_map,
                structure_min_identity=args.structure_min_identity)
            if args.processes:
                opts.processes = args.processes
            build(opts, overwrite=args.overwrite)
        elif args.cmd == "superfamily-tasks":
            from data_tools.tasks import superfamily_tasks
            superfamily_tasks(args.inputs, args.out, args.label, args.min_members, args.min_length, args.max_length,
                              tuple(t for t in args.tasks.split(",") if t), args.skip_bad, args.keep_unreviewed)
        elif args.cmd == "verify":
            from data_tools.shards import verify
            rep = verify(args.manifest)
            print(json.dumps(rep, indent=1))
            return 1 if rep["problems"] else 0
        elif args.cmd == "fetch-uniprot":
            from data_tools.fetch import DEFAULT_QUERY, fetch_uniprot
            n = fetch_uniprot(args.out, args.limit, args.query or DEFAULT_QUERY)
            print(f"{n:,} records -> {args.out}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
