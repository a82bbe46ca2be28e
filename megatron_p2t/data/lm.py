"""Language-model documents for a decoder-only recipe's stage 1 (ProLLaMA's continual pretraining on proteins
written as text): each sample's text (`Seq=<MKV...>`, written by `data_tools build --lm-text`) becomes the
document `<bos> text <end>`, every token after the first a target, and documents are packed whole into rows of
`instruct.pack_length` tokens with attention confined to each document and positions restarting at each
(ProLLaMA concatenates and chunks without a document mask). A document longer than a row arrives as a seeded
random window of a row's length (the stage's loader runs with text_crop=window, max_text_tokens=pack_length-1),
unended; `stats["cut"]` counts them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_p2t.data.instruct import Encoded, PackedLoader


def document(bos: int, text_ids) -> Encoded:
    ids = np.concatenate([[bos], np.asarray(text_ids, dtype=np.int64)])
    targets = np.full(len(ids), -100, dtype=np.int64)
    targets[:-1] = ids[1:]
    return Encoded(ids, targets, 0)


class DocumentLoader(PackedLoader):
    """A ProteinTextLoader's batches as packed language-model rows (the batch keys stage 2 uses, so the same
    model step trains both)."""

    def __init__(self, loader, bos: int, pack_length: Optional[int], pack: bool = True):
        if bos is None:
            raise ValueError(f"{loader.cfg.text_tokenizer}: the tokenizer has no bos token to start documents with")
        super().__init__(loader)
        self.bos, self.pack_length, self.pack = bos, pack_length, pack
        self.stats = {"documents": 0, "cut": 0, "tokens": 0}

    def encode(self, b: dict, i: int) -> Encoded:
        doc = document(self.bos, b["text_ids"][i][b["text_mask"][i]].numpy())
        self.stats["documents"] += 1
        self.stats["cut"] += int(b["cut"][i])
        self.stats["tokens"] += len(doc.ids)
        return doc

