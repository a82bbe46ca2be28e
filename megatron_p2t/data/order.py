"""Which samples each data-parallel rank reads, per epoch, computed identically on every rank from the
manifest's shard counts alone (no communication, no shared state).

Each epoch permutes the shards (seeded), concatenates them into one stream and cuts it into dp_size contiguous
ranges of equal size (+-1 sample). Every sample of the split belongs to exactly one rank each epoch; a rank
reads only the shards its range touches (at most two of them partially). The rank's ranges for epochs
0, 1, 2, ... are concatenated into one endless stream and addressed by a position in it; `chunks` cuts that
stream into pieces no larger than `chunk` samples and never spanning two shards, the unit workers read.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, List, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunk:
    epoch: int
    shard: int          # index into the shard list
    start: int          # first sample within the shard
    stop: int
    pos: int            # position of the first sample in the rank's stream


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards)


def rank_bounds(total: int, dp_rank: int, dp_size: int) -> Tuple[int, int]:
    base, extra = divmod(total, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return start, start + base + (1 if dp_rank < extra else 0)


def rank_samples_per_epoch(counts: Sequence[int], dp_rank: int, dp_size: int) -> int:
    a, b = rank_bounds(int(sum(counts)), dp_rank, dp_size)
    return b - a


def epoch_chunks(counts: Sequence[int], seed: int, epoch: int, dp_rank: int, dp_size: int,
                 chunk: int) -> List[Tuple[int, int, int]]:
    """(shard, start, stop) pieces of this rank's range for one epoch, in stream order."""
    counts = np.asarray(counts, dtype=np.int64)
    order = shard_order(len(counts), seed, epoch)
    lo, hi = rank_bounds(int(counts.sum()), dp_rank, dp_size)
    out, offset = [], 0
    for s in order:
        n = int(counts[s])
        a, b = max(lo, offset), min(hi, offset + n)
        for start in range(a, b, chunk):
            out.append((int(s), start - offset, min(b, start + chunk) - offset))
        offset += n
        if offset >= hi:
            break
    return out


def chunks(counts: Sequence[int], seed: int, dp_rank: int, dp_size: int, chunk: int, start_pos: int = 0,
           epochs: int | None = None) -> Iterator[Chunk]:
    """The rank's endless (or `epochs`-long) chunk stream, from the chunk that holds `start_pos`."""
    per_epoch = rank_samples_per_epoch(counts, dp_rank, dp_size)
    if per_epoch == 0:
        raise ValueError(f"data-parallel rank {dp_rank} of {dp_size} gets no sample: the split has only "
                         f"{sum(counts)} samples; use fewer data-parallel ranks or more data")
    epoch, pos = divmod(start_pos, per_epoch)
    pos = epoch * per_epoch
    while epochs is None or epoch < epochs:
        for shard, a, b in epoch_chunks(counts, seed, epoch, dp_rank, dp_size, chunk):
            if pos + (b - a) > start_pos:
                yield Chunk(epoch, shard, a, b, pos)
            pos += b - a
        epoch += 1
