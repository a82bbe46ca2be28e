import itertools

import numpy as np

from megatron_p2t.data import order


def test_ranges_cover_every_sample_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 50, size=rng.integers(1, 12)).tolist()
        w = int(rng.integers(1, 9))
        if sum(counts) < w:
            continue
        for epoch in range(2):
            seen = []
            for r in range(w):
                for s, a, b in order.epoch_chunks(counts, 3, epoch, r, w, chunk=7):
                    assert 0 <= a < b <= counts[s] and b - a <= 7
                    seen += [(s, i) for i in range(a, b)]
            assert sorted(seen) == [(s, i) for s in range(len(counts)) for i in range(counts[s])]
        sizes = [order.rank_samples_per_epoch(counts, r, w) for r in range(w)]
        assert max(sizes) - min(sizes) <= 1


def test_epochs_reorder_and_stream_positions_are_contiguous():
    counts = [10, 20, 5, 17]
    assert order.epoch_chunks(counts, 0, 0, 0, 2, 4) != order.epoch_chunks(counts, 0, 1, 0, 2, 4)
    stream = list(itertools.islice(order.chunks(counts, 0, 1, 2, 4), 30))
    pos = 0
    for c in stream:
        assert c.pos == pos
        pos += c.stop - c.start
    resumed = list(itertools.islice(order.chunks(counts, 0, 1, 2, 4, start_pos=stream[11].pos + 1), 5))
    assert resumed == stream[11:16]
