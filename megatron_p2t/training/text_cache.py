"""Stage 1's text side computed once. LLaMA is frozen in stage 1, so each function text's pooled layer-k
vectors never change: `megatron-p2t cache-text` writes them per shard, beside the data shards, and training
reads them instead of running the decoder.

Layout: <manifest dir>/text_cache/<name>/ holds, per shard, `<shard>.npz` with the sample keys (in shard
order), `mean` and `std` [n, hidden] float32, and `cache.json` naming what produced them (LLaMA directory, layer,
tokenizer, max_text_tokens). Shards are divided over data-parallel ranks; tensor-parallel peers compute each
shard together and the first of them writes it (atomically).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from megatron_p2t.parts.assemble import build_text_side
from megatron_p2t.data.loader import encode_texts
from megatron_p2t.data.shards import ShardCursor, read_manifest
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device


def cache_name(cfg) -> str:
    ident = json.dumps([os.path.abspath(cfg.model.llama), cfg.align.text_layer, cfg.data.text_tokenizer,
                        cfg.data.max_text_tokens])
    return f"layer{cfg.align.text_layer}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def cache_dir(cfg) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(cfg.data.manifest)), "text_cache", cache_name(cfg))


def build_cache(cfg, layout: Layout, batch_size: int = 16) -> dict:
    """Collective over the world: compute and write every split's text vectors. Returns counts."""
    text = build_text_side(cfg.model, cfg.align.text_layer, layout)
    tok = load_text_tokenizer(cfg.data.text_tokenizer)
    eot, pad = tok.convert_tokens_to_ids("<|eot_id|>"), tok.pad_token_id or 0
    out = cache_dir(cfg)
    os.makedirs(out, exist_ok=True)
    man, urls, counts, _ = read_manifest(cfg.data.manifest)
    dp, dpr = layout.dp, layout.dp_rank
    writer = layout.tp_rank == 0
    written = 0
    for i, (url, count) in enumerate(zip(urls, counts)):
        if i % dp != dpr:
            continue
        target = os.path.join(out, os.path.basename(url).replace(".tar", ".npz"))
        samples = ShardCursor(url, count).take(0, count)
        texts = [s["txt"].decode() for s in samples]
        ids = [t[: cfg.data.max_text_tokens - 1] + [eot] for t in encode_texts(tok, texts)]
        means, stds = [], []
        for b in range(0, len(ids), batch_size):
            chunk = ids[b:b + batch_size]
            width = max(map(len, chunk))
            t = torch.full((len(chunk), width), pad, dtype=torch.long)
            m = torch.zeros(len(chunk), width, dtype=torch.bool)
            for j, row in enumerate(chunk):
                t[j, :len(row)] = torch.tensor(row)
                m[j, :len(row)] = True
            if torch.cuda.is_available():
                t, m = t.cuda(), m.cuda()
            mean, std = text(t, m)
            means.append(mean.float().cpu().numpy())
            stds.append(std.float().cpu().numpy())
        if writer:
            tmp = target + ".tmp.npz"
            np.savez(tmp, keys=np.array([s["__key__"] for s in samples]), mean=np.concatenate(means),
                     std=np.concatenate(stds))
            os.replace(tmp, target)
            written += len(samples)
    total = torch.tensor([written], device=collective_device())
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "cache.json"), "w") as f:
            json.dump({"llama": os.path.abspath(cfg.model.llama), "text_layer": cfg.align.text_layer,
                       "text_tokenizer": cfg.data.text_tokenizer, "max_text_tokens": cfg.data.max_text_tokens,
                       "samples": int(total), "shards": len(man["shards"])}, f, indent=1)
    dist.barrier()
    return {"dir": out, "samples": int(total)}
