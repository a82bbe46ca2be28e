"""The shards format, read in one place: a manifest (manifest.json: shards with split, path, count, sha256,
written by data_tools) and its WebDataset tar shards. The loader, the text cache and the evaluation read
through here."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List

from megatron_p2t.data import tar_samples


class ShardError(RuntimeError):
    pass


def read_manifest(path: str, split: str | None = None):
    """(manifest, shard urls, sample counts, sha256s) of one split's shards (None: every split's), in order."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no manifest; build shards with `python -m data_tools build ... --out DIR`")
    with open(path) as f:
        man = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    shards = [s for s in man["shards"] if split is None or s["split"] == split]
    if not shards:
        raise ValueError(f"{path}: split {split!r} has no shards (have: {sorted({s['split'] for s in man['shards']})})")
    urls = [s["path"] if ("://" in s["path"] or s["path"].startswith("pipe:")) else os.path.join(root, s["path"])
            for s in shards]
    return man, urls, [int(s["count"]) for s in shards], [s.get("sha256", "") for s in shards]


class ShardCursor:
    """Sequential reader over one shard; skips forward, never back."""

    def __init__(self, url: str, expected: int):
        self.url, self.expected, self.pos = url, expected, 0
        try:
            self._it = tar_samples.iter_samples(tar_samples.read_shard(url), url)
        except OSError as e:
            raise ShardError(f"{url}: cannot be read ({e}) -- check the path/URL in the manifest") from None

    def take(self, start: int, stop: int) -> List[dict]:
        out = []
        try:
            while self.pos < stop:
                s = next(self._it)
                if self.pos >= start:
                    out.append(s)
                self.pos += 1
        except StopIteration:
            raise ShardError(f"{self.url}: ends after {self.pos} samples, the manifest says {self.expected} -- the "
                             f"shard is truncated or was replaced; check with `python -m data_tools verify "
                             f"MANIFEST` and rebuild it") from None
        except (tar_samples.TarFormatError, UnicodeDecodeError) as e:
            raise ShardError(f"{e} -- the shard is corrupt after {self.pos} samples; check with "
                             f"`python -m data_tools verify MANIFEST` and rebuild it") from None
        return out


def split_samples(manifest: str, split: str) -> Iterator[Dict]:
    """Every sample of a split, in shard order (tar members as bytes; `__key__` is the sample key)."""
    _, urls, counts, _ = read_manifest(manifest, split)
    for url, n in zip(urls, counts):
        yield from ShardCursor(url, n).take(0, n)
