"""ESM-2's 33-token alphabet, as in facebook/esm2_* vocab.txt (and HF EsmTokenizer), with a byte lookup table
so tokenising a protein is one numpy indexing op rather than a Python loop per residue."""
from __future__ import annotations

import os
from typing import List

import numpy as np

TOKENS: List[str] = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P",
                     "K", "Q", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>",
                     "<mask>"]
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
VOCAB_SIZE = len(TOKENS)

_LUT = np.full(256, UNK, dtype=np.int64)
for _i, _t in enumerate(TOKENS):
    if len(_t) == 1:
        _LUT[ord(_t)] = _i
        _LUT[ord(_t.lower())] = _i


def encode(seq: bytes | str, add_special: bool = True) -> np.ndarray:
    """Residues -> ids, with <cls> ... <eos> around them as ESM-2 was trained."""
    raw = seq.encode() if isinstance(seq, str) else seq
    ids = _LUT[np.frombuffer(raw, dtype=np.uint8)]
    if add_special:
        ids = np.concatenate(([CLS], ids, [EOS]))
    return ids


def decode(ids) -> str:
    return "".join(TOKENS[i] for i in ids if i not in (CLS, PAD, EOS))


def write_vocab(directory: str) -> str:
    """vocab.txt in the layout HF's EsmTokenizer reads."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(TOKENS) + "\n")
    return path
