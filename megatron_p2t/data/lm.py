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
import torch

from megatron_p2t.data.instruct import Encoded, collate_instruct


def document(bos: int, text_ids) -> Encoded:
    ids = np.concatenate([[bos], np.asarray(text_ids, dtype=np.int64)])
    targets = np.full(len(ids), -100, dtype=np.int64)
    targets[:-1] = ids[1:]
    return Encoded(ids, targets, 0)


class DocumentLoader:
    """A ProteinTextLoader's batches as packed language-model rows (the batch keys stage 2 uses, so the same
    model step trains both). Its resumable position is the wrapped loader's."""

    def __init__(self, loader, bos: int, pack_length: Optional[int], pack: bool = True):
        if bos is None:
            raise ValueError(f"{loader.cfg.text_tokenizer}: the tokenizer has no bos token to start documents with")
        self.loader, self.bos, self.pack_length, self.pack = loader, bos, pack_length, pack
        self.pad_id = loader.text_pad
        self.stats = {"documents": 0, "cut": 0, "tokens": 0}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        for b in self.loader:
            yield self.convert(b)

    def convert(self, b: dict) -> Optional[dict]:
        keep = [i for i, v in enumerate(b["valid"].tolist()) if v]
        if not keep:
            return None
        docs = [document(self.bos, b["text_ids"][i][b["text_mask"][i]].numpy()) for i in keep]
        self.stats["cut"] += sum(b["cut"][i] for i in keep)
        self.stats["documents"] += len(docs)
        self.stats["tokens"] += sum(len(d.ids) for d in docs)
        idx = torch.tensor(keep)
        out = collate_instruct(docs, b["protein_ids"][idx], b["protein_mask"][idx], self.pad_id, self.pack,
                               self.pack_length)
        out["keys"] = [b["keys"][i] for i in keep]
        return out

