"""The build pipeline: read + clean (parallel) -> de-duplicate -> split (MMseqs2) -> shards (parallel) -> manifest.

Each stage leaves its output and a small done-file carrying a fingerprint of the inputs and options that
produced it. A rerun with the same inputs and options resumes after the last finished stage (and, inside
the shard stage, after the last finished shard); different options in the same --out are refused.

Nothing holds the data in memory (UniRef50 is tens of GB): records stream to work/records.jsonl, and what the
later stages need per record is a fixed-size number -- a 128-bit key digest for de-duplication (duplicates are
found by sorting those, the first occurrence kept), its byte offset and length, a cluster index, a split code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from array import array
from collections import Counter
from typing import Iterator, List, Optional

import numpy as np

from data_tools import readers, shards, split as splitting, structures as structures_mod
from data_tools.clean import CleanOptions, check_lm_text, clean_chunk, drop_table
from data_tools.records import DataError

VERSION = 1


@dataclasses.dataclass
class BuildOptions:
    inputs: List[str]
    out: str
    format: Optional[str] = None
    annotations: Optional[str] = None
    skip_bad: bool = False
    clean: CleanOptions = dataclasses.field(default_factory=CleanOptions)
    split: splitting.SplitOptions = dataclasses.field(default_factory=splitting.SplitOptions)
    shard_size_mb: float = 32.0
    samples_per_shard: Optional[int] = None    # overrides shard_size_mb
    processes: int = max(1, os.cpu_count() or 1)
    quiet: bool = False
    # 3D structures (data_tools/structures.py): a directory or tar of PDB/mmCIF/AlphaFold files named by accession,
    # or a map file of accession<TAB>path[<TAB>chain]
    structures: Optional[str] = None
    structure_map: Optional[str] = None
    structure_min_identity: float = structures_mod.MIN_IDENTITY


def log(opts: BuildOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stage_done(path: str, fp: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("fingerprint") != fp:
        raise DataError(path, "this --out holds a build made from other inputs or options", kind="usage",
                        fix="use a new --out directory, or pass --overwrite to start this one again")
    return done


def _source_info(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime": int(st.st_mtime)}


def _parse_and_clean(args):
    """In a worker: a chunk's kept records as (dedup key, JSON line) -- encoded here, so the one writing process
    only hashes and appends bytes."""
    chunk, skip_bad, clean_opts = args
    records, bad = readers.parse(chunk, skip_bad)
    kept, dropped = clean_chunk(records, clean_opts)
    rows = [(r.key, (json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n").encode()) for r in kept]
    return rows, bad, dropped, len(records)


def _pool(n: int):
    return mp.get_context("fork").Pool(n) if n > 1 else None


def stage_records(opts: BuildOptions, work: str) -> dict:
    sources = [dict(_source_info(p), format=opts.format or readers.detect_format(p)) for p in opts.inputs]
    fp = _fingerprint(VERSION, sources, opts.annotations, opts.skip_bad, dataclasses.asdict(opts.clean))
    done_path = os.path.join(work, "records.done.json")
    if (done := _stage_done(done_path, fp)) is not None:
        log(opts, f"[1/3] records: reusing {done['kept']:,} cleaned records from an earlier run")
        return done
    t0 = time.time()
    read, bad, dropped = 0, Counter(), Counter()
    offsets, digests = array("q"), array("Q")   # per record written: where it starts; its key's 128-bit digest
    out_path = os.path.join(work, "records.jsonl")

    # Pool.imap reads its input ahead without bound: when writing here is slower than parsing in the workers, the
    # parsed chunks would pile up in its result cache, the whole input at the end. The window bounds the chunks
    # read but not yet written.
    window = threading.BoundedSemaphore(2 * max(1, opts.processes) + 2)

    def tasks():
        for s in sources:
            for c in readers.chunks(s["path"], s["format"], opts.annotations,
                                    sequence_only=opts.clean.lm_text is not None):
                window.acquire()
                yield c, opts.skip_bad, opts.clean

    pool = _pool(opts.processes)
    try:
        results = pool.imap(_parse_and_clean, tasks()) if pool else map(_parse_and_clean, tasks())
        end = 0      # tracked here: tell() on a buffered file flushes it, a system call per record
        with open(out_path + ".tmp", "wb") as out:
            for rows, b, d, n in results:
                window.release()
                read += n
                bad.update(b)
                dropped.update(d)
                for key, line in rows:
                    h = hashlib.blake2b(key.encode(), digest_size=16).digest()
                    digests.extend((int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")))
                    offsets.append(end)
                    end += len(line)
                out.write(b"".join(line for _, line in rows))
            out.flush()
            os.fsync(out.fileno())
    finally:
        if pool:
            pool.close()
            pool.join()
    os.replace(out_path + ".tmp", out_path)
    starts = np.frombuffer(offsets, dtype=np.int64) if len(offsets) else np.zeros(0, np.int64)
    lengths = np.diff(np.append(starts, end))
    keep = first_occurrences(np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2) if len(digests) else
                             np.zeros((0, 2), np.uint64))
    if len(keep) < len(starts):
        dropped["duplicate_accession"] += len(starts) - len(keep)
    kept = len(keep)
    np.save(os.path.join(work, "offsets.npy"), starts[keep])
    np.save(os.path.join(work, "lengths.npy"), lengths[keep])
    secs = time.time() - t0
    in_bytes = sum(s["bytes"] for s in sources)
    report = {"fingerprint": fp, "sources": sources, "records_read": read, "bad_input": dict(bad),
              "dropped": dict(dropped), "kept": kept, "seconds": round(secs, 3)}
    _atomic_json(done_path, report)
    log(opts, f"[1/3] records: {read:,} read from {len(sources)} file(s), {in_bytes / 2**20:.1f} MiB on disk, "
              f"{secs:.1f} s\n{drop_table(read, dropped, bad, kept)}")
    return report


def first_occurrences(digests: np.ndarray) -> np.ndarray:
    """Indices of the rows of digests [n, 2] (uint64) that occur first, in order: a stable sort groups equal
    digests with the earliest first."""
    if not len(digests):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    s = digests[order]
    new = np.ones(len(s), dtype=bool)
    new[1:] = (s[1:] != s[:-1]).any(axis=1)
    return np.sort(order[new])


def iter_records(work: str, fields) -> Iterator[dict]:
    """The kept records' `fields`, in order, read sequentially from records.jsonl (duplicates skipped)."""
    offsets = np.load(os.path.join(work, "offsets.npy"), mmap_mode="r")
    with open(os.path.join(work, "records.jsonl"), "rb") as f:
        for i in range(0, len(offsets), 1 << 16):          # a block of offsets at a time, not a list of all
            for off in offsets[i:i + (1 << 16)].tolist():
                if f.tell() != off:
                    f.seek(off)
                r = json.loads(f.readline())
                yield {k: r[k] for k in fields}


def stage_split(opts: BuildOptions, work: str, rec_report: dict) -> dict:
    sopts = dataclasses.asdict(opts.split)
    fp = _fingerprint(rec_report["fingerprint"], sopts)
    done_path = os.path.join(work, "split.done.json")
    if (done := _stage_done(done_path, fp)) is not None:
        log(opts, "[2/3] split: reusing the split from an earlier run")
        return done
    t0 = time.time()
    n = rec_report["kept"]
    sequences = lambda: ((i, r["sequence"]) for i, r in enumerate(iter_records(work, ("sequence",))))
    mode = opts.split.mode
    dropped = Counter()
    if mode == "mmseqs":
        fasta = os.path.join(work, "all.fa")
        splitting.write_fasta(fasta, ((f"r{i}", seq) for i, seq in sequences()))
        rep = splitting.cluster_indices(fasta, work, opts.split, n)
        n_clusters = int(len(np.unique(rep)))
        codes = splitting.assign_clusters(rep, opts.split)
    elif mode == "lists":
        if not opts.split.lists:
            raise DataError("--split lists", "no lists given", kind="usage", fix="pass --split-list train=FILE ...")
        which = splitting.read_lists(opts.split.lists)
        codes = np.fromiter((which.get(r["accession"], -1) for r in iter_records(work, ("accession",))),
                            dtype=np.int8, count=n)
        dropped["not_in_split_lists"] = int((codes < 0).sum())
        n_clusters = None
    elif mode == "source":
        alias = {"train": 0, "valid": 1, "validation": 1, "val": 1, "test": 2}
        codes = np.empty(n, dtype=np.int8)
        missing, first = 0, None
        for i, r in enumerate(iter_records(work, ("accession", "source_split"))):
            codes[i] = alias.get(r["source_split"], -1)
            if codes[i] < 0:
                missing, first = missing + 1, first or r["accession"]
        if missing:
            raise DataError(opts.inputs[0], f"{missing} records carry no train/valid/test split (first: {first})",
                            kind="usage", fix="use --split mmseqs or --split lists")
        n_clusters = None
    else:
        raise DataError("--split", f"unknown split mode {mode!r}", kind="usage", fix="mmseqs, lists or source")
    check = splitting.homology_check(sequences, codes, work, opts.split, fix=(mode == "mmseqs"))
    report = {"fingerprint": fp, "mode": mode, "clusters": n_clusters,
              "counts": {s: int((codes == k).sum()) for k, s in enumerate(splitting.SPLITS)},
              "dropped": dict(dropped), "homology_check": check, "seconds": round(time.time() - t0, 3)}
    np.save(os.path.join(work, "split.npy"), codes)
    _atomic_json(done_path, report)
    log(opts, "[2/3] split: " + format_split_report(report))
    return report


def format_split_report(rep: dict) -> str:
    c = rep["counts"]
    chk = rep["homology_check"]
    lines = [f"mode={rep['mode']}" + (f", {rep['clusters']:,} MMseqs2 clusters" if rep["clusters"] else "")
             + f": train {c['train']:,} / valid {c['valid']:,} / test {c['test']:,}"]
    for k, v in rep["dropped"].items():
        if v:
            lines.append(f"  dropped: {k} {v:,}")
    if chk.get("moved_to_train"):
        lines.append(f"  moved to train after the homology search: {chk['moved_to_train']}")
    viol = sum(chk["violations"].values())
    lines.append(f"  homology check (mmseqs easy-search valid+test vs train, identity >= {chk['min_seq_id']:.2f}, "
                 f"coverage >= {chk['coverage']:.2f}): {viol} of {chk['searched']:,} held-out sequences have a "
                 f"train neighbour; closest train hit: " +
                 ", ".join(f"{s} {v:.3f}" for s, v in chk["max_identity"].items()))
    return "\n".join(lines)


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


_STRUCTURES = None   # (StructureSource, min identity, skip_bad), set before the shard workers fork


def _structure_members(recs: List[dict]):
    """Each record's structure members and the counts: full / partial coverage, none found, bad (by kind)."""
    source, min_identity, skip_bad = _STRUCTURES
    extra, counts = [], Counter()
    for r in recs:
        found = source.find(r["accession"])
        if found is None:
            extra.append([])
            counts["none"] += 1
            continue
        data, where, chain = found
        try:
            st = structures_mod.read_structure(data, where, r["accession"], r["sequence"], chain, min_identity)
        except DataError as e:
            if not skip_bad:
                raise
            extra.append([])    # the record trains sequence-only; the structure is counted, not silently lost
            counts[f"bad_{e.kind}"] += 1
            continue
        extra.append(structures_mod.sample_members(shards.sample_key(r), st))
        counts["full" if st.mask.all() else "partial"] += 1
        counts["plddt"] += st.plddt is not None
    return extra, dict(counts)


def _write_shard_task(args):
    records_path, offsets, out_path = args
    recs = []
    with open(records_path, "rb") as f:
        for off in offsets.tolist():
            f.seek(off)
            recs.append(json.loads(f.readline()))
    if _STRUCTURES is None:
        return shards.write_shard(out_path, recs)
    extra, counts = _structure_members(recs)
    return dict(shards.write_shard(out_path, recs, extra), structures=counts)


def _split_codes(work: str):
    """(split code, offset, byte length) of every kept record; also from a work directory an earlier version of
    this tool left (split.json of split names, no lengths.npy), so its build resumes."""
    offsets = np.load(os.path.join(work, "offsets.npy"))
    if os.path.exists(os.path.join(work, "lengths.npy")):
        sizes = np.load(os.path.join(work, "lengths.npy"))
    else:
        sizes = np.diff(np.append(offsets, os.path.getsize(os.path.join(work, "records.jsonl"))))
    if os.path.exists(os.path.join(work, "split.npy")):
        return np.load(os.path.join(work, "split.npy")), offsets, sizes
    with open(os.path.join(work, "split.json")) as f:
        names = json.load(f)
    return np.array([splitting.SPLITS.index(x) if x else -1 for x in names], dtype=np.int8), offsets, sizes


def stage_shards(opts: BuildOptions, work: str, rec_report: dict, split_report: dict) -> List[dict]:
    shard_dir = os.path.join(opts.out, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    journal_path = os.path.join(shard_dir, ".journal.jsonl")
    structure_opts = ([opts.structures, opts.structure_map, opts.structure_min_identity]
                      if opts.structures or opts.structure_map else [])
    fp = _fingerprint(split_report["fingerprint"], opts.shard_size_mb, opts.samples_per_shard,
                      *([structure_opts, opts.skip_bad] if structure_opts else []))
    fp_path = os.path.join(shard_dir, ".fingerprint")
    if os.path.exists(fp_path) and _read_text(fp_path) != fp:
        raise DataError(shard_dir, "shards from other options are here", kind="usage",
                        fix="use a new --out directory, or --overwrite")
    with open(fp_path, "w") as f:
        f.write(fp)
    codes, offsets, sizes = _split_codes(work)
    plan = []  # (split, shard path, record offsets)
    rng = np.random.default_rng(opts.split.seed)
    for k, s in enumerate(splitting.SPLITS):
        idx = np.flatnonzero(codes == k)
        if not len(idx):
            continue
        idx = idx[rng.permutation(len(idx))]
        per = opts.samples_per_shard or max(1, int(opts.shard_size_mb * 2**20 / float(sizes[idx].mean())))
        for j, start in enumerate(range(0, len(idx), per)):
            name = shards.SHARD_NAME.format(split=s, index=j)
            plan.append((s, os.path.join(shard_dir, name), offsets[idx[start:start + per]]))   # an array
    done = shards.read_journal(journal_path)
    todo = [p for p in plan if os.path.basename(p[1]) not in done or not os.path.exists(p[1])]
    for leftover in os.listdir(shard_dir):
        if leftover.endswith(".tmp"):
            os.remove(os.path.join(shard_dir, leftover))  # a shard a crash left half-written
    t0 = time.time()
    log(opts, f"[3/3] shards: {len(plan)} planned, {len(plan) - len(todo)} already done, writing {len(todo)} "
              f"with {min(opts.processes, max(1, len(todo)))} process(es)")
    rp = os.path.join(work, "records.jsonl")
    global _STRUCTURES
    if structure_opts and todo:
        source = structures_mod.StructureSource(opts.structures, opts.structure_map)
        log(opts, f"[3/3] structures: {len(source.index):,} files indexed in {opts.structure_map or opts.structures}")
        _STRUCTURES = (source, opts.structure_min_identity, opts.skip_bad)
    pool = _pool(min(opts.processes, len(todo)))
    try:
        tasks = [(rp, offs, path) for _, path, offs in todo]
        results = pool.imap_unordered(_write_shard_task, tasks) if pool else map(_write_shard_task, tasks)
        for entry in results:
            shards.append_journal(journal_path, entry)
            done[entry["name"]] = entry
    finally:
        _STRUCTURES = None
        if pool:
            pool.close()
            pool.join()
    out = []
    for s, path, _ in plan:
        e = dict(done[os.path.basename(path)])
        out.append({"path": os.path.join("shards", e.pop("name")), "split": s, **e})
    log(opts, f"[3/3] shards: {len(todo)} written in {time.time() - t0:.1f} s")
    return out


def structure_counts(shard_list: List[dict]) -> dict:
    """Records with full, partial and no structure, and structures skipped as bad (by kind), over all shards."""
    total = Counter({"full": 0, "partial": 0, "none": 0})
    for e in shard_list:
        total.update(e.get("structures", {}))
    return dict(total)


def build(opts: BuildOptions, overwrite: bool = False) -> dict:
    if not opts.inputs:
        raise DataError("build", "no input files", kind="usage", fix="name at least one input file")
    if opts.clean.lm_text is not None:
        check_lm_text(opts.clean.lm_text)
    if overwrite and os.path.exists(opts.out):
        shutil.rmtree(opts.out)
    work = os.path.join(opts.out, "work")
    os.makedirs(work, exist_ok=True)
    manifest_path = os.path.join(opts.out, "manifest.json")
    rec = stage_records(opts, work)
    if rec["kept"] == 0:
        raise DataError(opts.inputs[0], "no record survived reading and cleaning", kind="usage",
                        fix="see the drop counts above; check --format, length limits and --keep-unreviewed")
    spl = stage_split(opts, work, rec)
    shard_list = stage_shards(opts, work, rec, spl)
    manifest = {
        "format": "megatron_p2t.shards/1",
        "sample": {"seq": "amino-acid sequence (ASCII)", "json": "metadata",
                   "txt": "function text (UTF-8)" if opts.clean.lm_text is None else
                   f"language-model text (UTF-8): {opts.clean.lm_text}"},
        "sources": rec["sources"],
        "options": json.loads(json.dumps(dataclasses.asdict(opts), default=str)),
        "records": {k: rec[k] for k in ("records_read", "bad_input", "dropped", "kept")},
        "split": {k: spl[k] for k in ("mode", "clusters", "counts", "dropped", "homology_check")},
        "splits": {s: {"count": sum(x["count"] for x in shard_list if x["split"] == s),
                       "shards": sum(1 for x in shard_list if x["split"] == s)} for s in splitting.SPLITS},
        "shards": shard_list,
    }
    if opts.structures or opts.structure_map:
        manifest["sample"].update({"coords.npy": "C-alpha coordinates, float32 [L, 3] (0 where missing)",
                                   "coords_mask.npy": "bool [L]: the residue has coordinates",
                                   "plddt.npy": "AlphaFold pLDDT, float32 [L] (NaN where missing)"})
        manifest["structures"] = structure_counts(shard_list)
        log(opts, "structures: " + ", ".join(f"{k} {v:,}" for k, v in manifest["structures"].items()))
    manifest["options"].pop("quiet", None)
    _atomic_json(manifest_path, manifest)
    log(opts, f"manifest: {manifest_path} ({len(shard_list)} shards: " +
        ", ".join(f"{s} {v['count']:,} in {v['shards']}" for s, v in manifest["splits"].items()) + ")")
    return manifest
