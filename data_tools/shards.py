"""WebDataset tar shards. Each sample: KEY.seq (residues), KEY.txt (function text), KEY.json (metadata), and with
--structures KEY.coords.npy (float32 [L, 3]), KEY.coords_mask.npy (bool [L]), KEY.plddt.npy (AlphaFold models).

Bytes are deterministic (fixed mtime/owner, seeded order) so a rebuild, or a resumed build, reproduces the
checksums of an uninterrupted one. A shard appears under its final name only after it is fully written and
fsync'd; the journal records each finished shard so a restarted build skips it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from typing import Dict, Iterator, List, Optional, Tuple

SHARD_NAME = "{split}-{index:06d}.tar"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(record: dict) -> str:
    # WebDataset groups files by the name up to the first dot, so keys must be dot- and slash-free.
    base = record["accession"] + (f"_{record['task']}" if record.get("task") else "")
    return _KEY_UNSAFE.sub("_", base)


def sample_members(record: dict) -> List[Tuple[str, bytes]]:
    key = sample_key(record)
    meta = {k: v for k, v in record.items() if k not in ("sequence", "function", "similarity", "xrefs")
            and v not in ("", None)}
    meta["length"] = len(record["sequence"])
    return [(f"{key}.seq", record["sequence"].encode()), (f"{key}.txt", record["function"].encode()),
            (f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, records: List[dict], extra: Optional[List[List[Tuple[str, bytes]]]] = None) -> Dict:
    """extra[i]: more members of record i (its structure: KEY.coords.npy, ...)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, r in enumerate(records):
                for name, data in sample_members(r) + (extra[i] if extra else []):
                    _add(tar, name, data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": os.path.basename(path), "count": len(records), "bytes": os.path.getsize(path),
            "sha256": file_sha256(path)}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_journal(path: str) -> Dict[str, Dict]:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash: that shard is simply rewritten
                done[e["name"]] = e
    return done


def append_journal(path: str, entry: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_shard_samples(path: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {ext: bytes}) in order, for checks and tools; the training loader streams through webdataset."""
    with tarfile.open(path) as tar:
        key, cur = None, {}
        for m in tar:
            k, ext = m.name.split(".", 1)
            if k != key and cur:
                yield key, cur
                cur = {}
            key = k
            cur[ext] = tar.extractfile(m).read()
        if cur:
            yield key, cur


def verify(manifest_path: str) -> Dict:
    """Re-hash every shard and count its samples against the manifest."""
    with open(manifest_path) as f:
        man = json.load(f)
    root = os.path.dirname(os.path.abspath(manifest_path))
    problems = []
    for s in man["shards"]:
        p = os.path.join(root, s["path"])
        if not os.path.exists(p):
            problems.append(f"{s['path']}: missing")
            continue
        if file_sha256(p) != s["sha256"]:
            problems.append(f"{s['path']}: checksum differs from the manifest (damaged or replaced)")
            continue
        n = sum(1 for _ in iter_shard_samples(p))
        if n != s["count"]:
            problems.append(f"{s['path']}: {n} samples, manifest says {s['count']}")
    return {"shards": len(man["shards"]), "problems": problems}
