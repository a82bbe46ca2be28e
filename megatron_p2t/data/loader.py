"""The training data loader: manifest + shards -> tokenised, batched samples for one data-parallel rank.

Order is a pure function of (manifest, seed, dp_rank, dp_size, batching options), never of timing or of the
number of DataLoader workers:
- order.py fixes which samples a rank reads, as an endless stream of epoch passes;
- worker k of K reads and tokenises chunks g = k, k+K, ... of that stream; DataLoader's round-robin hands them
  back in stream order;
- the main process gathers the stream into blocks of `shuffle_block` samples, permutes each block (seeded by
  block number), and cuts it into batches: fixed `batch_size`, or by `max_tokens` of padded protein + text
  tokens after sorting the block by length (bucketing). Batches never span blocks.
So the position after any batch is (block, batch within block): `state_dict()` returns it, and a loader made
with it yields exactly the batches an uninterrupted run would have yielded next.

Training uses the endless stream (equal step counts on every rank by construction). A finite pass
(`epochs=1`, validation) uses fixed-size batches; every rank yields the same number of batches, the short
ones padded with copies marked `valid=False`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.structures import load_npy
from megatron_p2t.data import esm_alphabet, order
from megatron_p2t.data.shards import ShardCursor, ShardError, read_manifest


@dataclasses.dataclass
class LoaderConfig:
    manifest: str = ""
    split: str = "train"
    text_tokenizer: Optional[str] = None    # directory loadable by AutoTokenizer; None: protein side only
    batch_size: Optional[int] = 8           # fixed batch size (per rank) ...
    max_tokens: Optional[int] = None        # ... or a budget of padded protein + text tokens per batch
    max_protein_residues: int = 1021        # longer proteins: a random window (Prot2Text-V2's crop)
    max_text_tokens: int = 512
    # the token that ends every text (LLaMA-3.1-Instruct: <|eot_id|>; a base model's eos, e.g. </s>); a text longer
    # than max_text_tokens is cut: `tail` keeps its start and still ends it, `window` (set by the stage for
    # language-model documents) takes a seeded random window of max_text_tokens, unended
    text_end: str = "<|eot_id|>"
    text_crop: str = "tail"
    shuffle_block: int = 1024
    chunk: int = 128
    num_workers: int = 2
    prefetch_factor: int = 4
    seed: int = 0
    epochs: Optional[int] = None            # None: endless (training); n: a finite pass of n epochs
    text_cache: Optional[str] = None        # a cache-text directory: attach precomputed text vectors
    # 3D structure (model.encoder=esm2_structure sets it): batches carry protein_coords [b, s, 3] and coords_mask
    # [b, s] per ESM token; a protein whose shard has no KEY.coords.npy trains sequence-only
    structure: bool = False
    structure_dropout: float = 0.0          # set for training by the stages (model.structure.dropout)


def encode_texts(tok, texts: List[str]) -> List[List[int]]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # one Rust call per chunk, without the Python wrapper's per-call bookkeeping
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


class _ChunkStream(IterableDataset):
    """Runs in DataLoader workers: reads and tokenises this worker's share of the rank's chunks."""

    def __init__(self, cfg: LoaderConfig, urls, counts, dp_rank, dp_size, start_pos: int):
        self.cfg, self.urls, self.counts = cfg, urls, counts
        self.dp_rank, self.dp_size, self.start_pos = dp_rank, dp_size, start_pos

    def __iter__(self):
        info = get_worker_info()
        k, n_workers = (info.id, info.num_workers) if info else (0, 1)
        tok = None
        if self.cfg.text_tokenizer:
            from megatron_p2t.data.text_tokenizer import end_token_id, load_text_tokenizer
            tok = load_text_tokenizer(self.cfg.text_tokenizer, self.cfg.text_end)
            eot = end_token_id(tok, self.cfg.text_end)
        cursor: Optional[ShardCursor] = None
        cursor_shard = cursor_epoch = None
        cache = None
        stream = order.chunks(self.counts, self.cfg.seed, self.dp_rank, self.dp_size, self.cfg.chunk,
                             self.start_pos, self.cfg.epochs)
        for g, ch in enumerate(stream):
            if g % n_workers != k:
                continue
            if cursor is None or cursor_shard != ch.shard or cursor_epoch != ch.epoch or cursor.pos > ch.start:
                cursor = ShardCursor(self.urls[ch.shard], self.counts[ch.shard])
                cursor_shard, cursor_epoch = ch.shard, ch.epoch
                if self.cfg.text_cache:
                    cache = _load_cache(self.cfg.text_cache, self.urls[ch.shard])
            raw = cursor.take(ch.start, ch.stop)
            texts = [s["txt"].decode() for s in raw]
            # with cached text vectors the text need not be tokenised here
            text_ids = encode_texts(tok, texts) if tok is not None and cache is None else [[] for _ in raw]
            out = []
            for i, (s, t) in enumerate(zip(raw, text_ids)):
                pos = ch.pos + i
                seq = s["seq"]
                coords = _structure(s, self.cfg, [self.cfg.seed, ch.epoch, pos, 0x5D]) if self.cfg.structure else None
                if len(seq) > self.cfg.max_protein_residues:
                    r = np.random.default_rng([self.cfg.seed, ch.epoch, pos, 0xC0])
                    a = int(r.integers(0, len(seq) - self.cfg.max_protein_residues + 1))
                    seq = seq[a:a + self.cfg.max_protein_residues]
                    if coords is not None:    # the same window of the structure
                        coords = tuple(x[a:a + self.cfg.max_protein_residues] for x in coords)
                cut = tok is not None and cache is None and len(t) + 1 > self.cfg.max_text_tokens
                if tok is not None and cache is None:
                    t = _crop_text(t, eot, self.cfg, [self.cfg.seed, ch.epoch, pos, 0x7E47])
                sample = {"key": s["__key__"], "protein": esm_alphabet.encode(seq),
                          "text": np.asarray(t, dtype=np.int64), "raw_text": texts[i],
                          "meta": json.loads(s["json"]), "epoch": ch.epoch, "pos": pos, "cut": cut}
                if self.cfg.structure:
                    sample["coords"] = coords
                if cache is not None:
                    row = ch.start + i
                    if cache["keys"][row] != s["__key__"]:
                        raise ShardError(f"{self.cfg.text_cache}: cached row {row} of {self.urls[ch.shard]} is "
                                         f"{cache['keys'][row]!r}, the shard has {s['__key__']!r} -- the cache is "
                                         f"stale; run `megatron-p2t cache-text` again")
                    sample["text_mean"], sample["text_std"] = cache["mean"][row], cache["std"][row]
                out.append(sample)
            yield ch.pos, out


def _structure(s: dict, cfg: LoaderConfig, seed):
    """(coords [L, 3] float32, mask [L] bool) of a sample, or None: no structure in its shard, or left out by the
    structure dropout (drawn from the sample's position, so a resumed run leaves out the same ones)."""
    if "coords.npy" not in s:
        return None
    if cfg.structure_dropout and np.random.default_rng(seed).random() < cfg.structure_dropout:
        return None
    coords, mask = load_npy(s["coords.npy"]), load_npy(s["coords_mask.npy"])
    if coords.shape != (len(s["seq"]), 3) or mask.shape != (len(s["seq"]),):
        raise ShardError(f"{s.get('__url__', '')}: sample {s['__key__']} has coords {coords.shape} and mask "
                         f"{mask.shape} for {len(s['seq'])} residues; rebuild the shards with data_tools")
    return coords.astype(np.float32), mask.astype(bool)


def _crop_text(t: List[int], end: int, cfg: LoaderConfig, seed) -> List[int]:
    if cfg.text_crop == "window" and len(t) + 1 > cfg.max_text_tokens:
        a = int(np.random.default_rng(seed).integers(0, len(t) - cfg.max_text_tokens + 1))
        return t[a:a + cfg.max_text_tokens]
    return t[: cfg.max_text_tokens - 1] + [end]


def _load_cache(directory: str, shard_url: str) -> dict:
    path = os.path.join(directory, os.path.basename(shard_url).replace(".tar", ".npz"))
    if not os.path.exists(path):
        raise ShardError(f"{path}: no cached text vectors for this shard; run `megatron-p2t cache-text` with the "
                         f"same config first")
    with np.load(path) as z:
        return {"keys": [str(k) for k in z["keys"]], "mean": z["mean"], "std": z["std"]}


def collate(samples: List[dict], text_pad: int, valid: Optional[List[bool]] = None) -> Dict:
    """Right-padded id tensors and masks. Padding happens in numpy (one row copy per sample) and becomes a
    tensor once: torch indexing per row costs more than the rest of the batch on a busy CPU."""
    n = len(samples)
    plen = np.array([len(s["protein"]) for s in samples])
    tlen = np.array([len(s["text"]) for s in samples])
    prot = np.full((n, int(plen.max())), esm_alphabet.PAD, dtype=np.int64)
    text = np.full((n, max(int(tlen.max()), 1)), text_pad, dtype=np.int64)
    for i, s in enumerate(samples):
        prot[i, : plen[i]] = s["protein"]
        text[i, : tlen[i]] = s["text"]
    extra = {}
    if "text_mean" in samples[0]:
        extra = {"text_mean": torch.from_numpy(np.stack([s["text_mean"] for s in samples])),
                 "text_std": torch.from_numpy(np.stack([s["text_std"] for s in samples]))}
    if "coords" in samples[0]:       # per ESM token: <cls> (position 0) and <eos> have no coordinates
        xyz = np.zeros(prot.shape + (3,), dtype=np.float32)
        known = np.zeros(prot.shape, dtype=bool)
        for i, s in enumerate(samples):
            if s["coords"] is not None:
                c, m = s["coords"]
                xyz[i, 1:1 + len(c)], known[i, 1:1 + len(m)] = c, m
        extra.update(protein_coords=torch.from_numpy(xyz), coords_mask=torch.from_numpy(known))
    return {**extra, "protein_ids": torch.from_numpy(prot),
            "protein_mask": torch.from_numpy(np.arange(prot.shape[1])[None, :] < plen[:, None]),
            "text_ids": torch.from_numpy(text),
            "text_mask": torch.from_numpy(np.arange(text.shape[1])[None, :] < tlen[:, None]),
            "valid": torch.tensor(valid if valid is not None else [True] * n),
            "keys": [s["key"] for s in samples], "epochs": [s["epoch"] for s in samples],
            "cut": [s["cut"] for s in samples],   # texts longer than max_text_tokens (cropped per text_crop)
            "texts": [s["raw_text"] for s in samples], "meta": [s["meta"] for s in samples]}


def token_budget_batches(samples: List[dict], max_tokens: int) -> List[List[dict]]:
    """Sort by length, then cut greedily so that rows x (longest protein + longest text) <= max_tokens."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i]["protein"]) + len(samples[i]["text"]), i))
    batches, cur, lp, lt = [], [], 0, 0
    for i in order:
        s = samples[i]
        np_, nt = max(lp, len(s["protein"])), max(lt, len(s["text"]))
        if cur and (len(cur) + 1) * (np_ + nt) > max_tokens:
            batches.append(cur)
            cur, np_, nt = [], len(s["protein"]), len(s["text"])
        cur.append(s)
        lp, lt = np_, nt
    if cur:
        batches.append(cur)
    return batches


def _as_is(x):
    return x  # keep numpy arrays: collation happens per batch in the main process


class ProteinTextLoader:
    def __init__(self, cfg: LoaderConfig, dp_rank: int = 0, dp_size: int = 1, state: Optional[dict] = None):
        """dp_rank / dp_size: this process's data-parallel coordinates (the run's Layout.dp_rank / .dp)."""
        if (cfg.batch_size is None) == (cfg.max_tokens is None):
            raise ValueError("set exactly one of batch_size (fixed batches) and max_tokens (token budget)")
        if cfg.epochs is not None and cfg.batch_size is None:
            raise ValueError("a finite pass (epochs set) needs fixed batch_size so every rank runs the same "
                             "number of steps; use max_tokens with the endless training stream")
        if cfg.max_tokens is not None and cfg.max_tokens < cfg.max_protein_residues + 2 + cfg.max_text_tokens:
            raise ValueError(f"max_tokens={cfg.max_tokens} cannot hold one sample of max_protein_residues+2 + "
                             f"max_text_tokens = {cfg.max_protein_residues + 2 + cfg.max_text_tokens} tokens")
        if cfg.text_crop not in ("tail", "window"):
            raise ValueError(f"data.text_crop={cfg.text_crop!r}: tail (keep the start, end it) or window (a random "
                             f"window, for language-model documents)")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.manifest, self.urls, self.counts, shas = read_manifest(cfg.manifest, cfg.split)
        if sum(self.counts) < dp_size:
            raise ValueError(f"{cfg.manifest}: split {cfg.split!r} has {sum(self.counts)} samples for {dp_size} "
                             f"data-parallel ranks")
        # Blocks hold whole fixed-size batches so no batch is ever cut short in the endless stream.
        self.block = cfg.shuffle_block if cfg.batch_size is None else \
            math.ceil(cfg.shuffle_block / cfg.batch_size) * cfg.batch_size
        self.per_epoch = order.rank_samples_per_epoch(self.counts, dp_rank, dp_size)
        self.fingerprint = hashlib.sha256(json.dumps(
            [shas, self.counts, cfg.split, cfg.seed, dp_rank, dp_size, self.block, cfg.batch_size, cfg.max_tokens,
             cfg.max_protein_residues, cfg.max_text_tokens, cfg.chunk, cfg.epochs, cfg.text_tokenizer]
            # the defaults add nothing, so the positions saved by runs made before these options still resume
            + ([cfg.text_end, cfg.text_crop] if (cfg.text_end, cfg.text_crop) != ("<|eot_id|>", "tail") else [])
            + ([cfg.structure, cfg.structure_dropout] if cfg.structure else [])
        ).encode()
        ).hexdigest()[:16]
        self.text_pad = 0
        if cfg.text_tokenizer:
            from megatron_p2t.data.text_tokenizer import load_text_tokenizer
            tok = load_text_tokenizer(cfg.text_tokenizer, cfg.text_end)
            self.text_pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._block, self._batch = 0, 0
        self.stats = {"real_tokens": 0, "padded_tokens": 0, "samples": 0, "batches": 0}
        if state is not None:
            self.load_state_dict(state)

    # -- resumable position --
    def state_dict(self) -> dict:
        return {"block": self._block, "batch": self._batch, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("the saved data-loader position belongs to other data, seed, batching or "
                             "data-parallel layout, so it cannot be resumed exactly; restore those settings "
                             "or restart the data stream")
        self._block, self._batch = int(state["block"]), int(state["batch"])

    def steps_per_epoch(self) -> Optional[int]:
        """Finite pass: the number of batches every rank yields (the largest rank's count)."""
        if self.cfg.epochs is None:
            return None
        most = max(order.rank_samples_per_epoch(self.counts, r, self.dp_size) for r in range(self.dp_size))
        return math.ceil(most * self.cfg.epochs / self.cfg.batch_size)

    def padding_fraction(self) -> float:
        return 1.0 - self.stats["real_tokens"] / max(1, self.stats["padded_tokens"])

    def _batches_of(self, block_no: int, samples: List[dict]) -> List[List[dict]]:
        rng = np.random.default_rng([self.cfg.seed, self.dp_rank, block_no, 0xB10C])
        samples = [samples[i] for i in rng.permutation(len(samples))]
        if self.cfg.batch_size is not None:
            b = self.cfg.batch_size
            return [samples[i:i + b] for i in range(0, len(samples), b)]
        batches = token_budget_batches(samples, self.cfg.max_tokens)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _chunk_stream(self, start_pos: int) -> Iterator:
        ds = _ChunkStream(self.cfg, self.urls, self.counts, self.dp_rank, self.dp_size, start_pos)
        if self.cfg.num_workers == 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context="fork"))

    def __iter__(self) -> Iterator[Dict]:
        total = None if self.cfg.epochs is None else self.per_epoch * self.cfg.epochs
        steps = self.steps_per_epoch()
        emitted = self._block * (self.block // (self.cfg.batch_size or 1)) + self._batch if steps else 0
        block_no, skip = self._block, self._batch
        start = block_no * self.block
        stream = self._chunk_stream(start) if total is None or start < total else iter(())
        pending: List[dict] = []
        last = None
        for first_pos, samples in stream:
            pending.extend(s for s in samples if s["pos"] >= start)
            while len(pending) >= self.block or (total is not None and pending and
                                                 block_no * self.block + len(pending) >= total):
                blk, pending = pending[: self.block], pending[self.block:]
                batches = self._batches_of(block_no, blk)
                for j in range(skip, len(batches)):
                    self._block, self._batch = block_no, j + 1
                    last = batches[j]
                    yield self._emit(batches[j], None)
                    emitted += 1
                skip = 0
                block_no += 1
                self._block, self._batch = block_no, 0
        while steps is not None and emitted < steps:
            # A finite pass: this rank has fewer samples than the largest one; keep step counts equal.
            filler = last[:1] if last else None
            if filler is None:
                raise RuntimeError("finite pass with no sample on this rank")
            emitted += 1
            yield self._emit(filler * self.cfg.batch_size, [False] * self.cfg.batch_size)

    def _emit(self, batch: List[dict], valid: Optional[List[bool]]) -> Dict:
        b = self.cfg.batch_size
        if valid is None and b is not None and len(batch) < b:
            valid = [True] * len(batch) + [False] * (b - len(batch))
            batch = batch + [batch[-1]] * (b - len(batch))
        out = collate(batch, self.text_pad, valid)
        real = [len(x["protein"]) + len(x["text"]) for x, ok in zip(batch, valid or [True] * len(batch)) if ok]
        self.stats["real_tokens"] += sum(real)
        self.stats["padded_tokens"] += len(real) * (out["protein_ids"].shape[1] + out["text_ids"].shape[1])
        self.stats["samples"] += len(real)
        self.stats["batches"] += 1
        return out
