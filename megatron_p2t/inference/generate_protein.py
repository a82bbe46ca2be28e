"""`megatron-p2t generate-protein`: text from a decoder-only protein LM (ProLLaMA-style), checked as proteins.

The model is an `export` of a decoder-only run (llama/ + tokenizer/ + megatron_p2t.json) or any HF
LlamaForCausalLM directory with its tokenizer (the published ProLLaMA). Prompts are ProLLaMA's plain
`<bos>instruction input` -- `[Generate by superfamily] Superfamily=<...>`, `[Determine superfamily] Seq=<...>`, or
`Seq=<` for stage 1's unconditional generation -- from --prompt, a tasks file (JSONL or an Alpaca JSON array of
{instruction, input[, output, id]}) or a split of built Alpaca shards (whose output is the reference).

Each output row carries the raw text and what was read from it: the sequence written as Seq=<...> (continued from
a prompt that opens one), whether it was closed, its letters outside the amino-acid alphabet (counted, never
dropped), a Superfamily=<...> label, and the one the prompt asked for. Sampling (temperature, top-k, top-p, seed)
or beam search; JSONL flushed per batch. Batches lie on a fixed grid over the rows and draw their seed from
(seed, their row ids), so a restart writes exactly the rows the uninterrupted run would have: a batch already
written is skipped, one cut short is generated again whole and only its missing rows are written.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from typing import Dict, List, Optional

from data_tools.records import AMINO_ACIDS
from megatron_p2t.inference.generate import done_ids

STANDARD = frozenset("ACDEFGHIKLMNPQRSTVWY")
_SEQ = re.compile(r"Seq=<([^>]*)(>?)")
_LABEL = re.compile(r"Superfamily=<([^>]*)>")


def read_sequence(prompt: str, output: str) -> dict:
    """The protein in a generation: Seq=<...> in the output, or the rest of one the prompt opened."""
    opened = _SEQ.findall(prompt)
    if opened and not opened[-1][1]:                  # the prompt ends inside Seq=<MKRV...: the output continues it
        head, _, rest = output.partition(">")
        seq, closed = opened[-1][0] + head, bool(_)
    else:
        m = _SEQ.search(output)
        if not m:
            return {"sequence": None, "closed": False, "invalid": {}, "nonstandard": {}}
        seq, closed = m.group(1), bool(m.group(2))
    seq = seq.strip()
    return {"sequence": seq, "closed": closed,
            "invalid": dict(Counter(c for c in seq if c not in AMINO_ACIDS)),     # not amino-acid letters at all
            "nonstandard": dict(Counter(c for c in seq if c in AMINO_ACIDS - STANDARD))}   # X, B, Z, U, O


def valid_protein(row: dict) -> bool:
    """A generated protein counts as valid when it is written out whole (closed), non-empty, and every letter is
    one of the 20 standard amino acids."""
    s = row.get("sequence")
    return bool(s) and row.get("closed", False) and not row.get("invalid") and not row.get("nonstandard")


def label_in(text: str) -> Optional[str]:
    m = _LABEL.search(text or "")
    return m.group(1).strip() if m else None


def tasks(input_path: Optional[str], prompt: Optional[str], num_samples: int = 1, split: str = "test",
          only: Optional[List[str]] = None) -> List[dict]:
    """[{id, instruction, input, reference?, task?}] for every sample to generate (num_samples per prompt); only:
    the rows of these tasks (e.g. generate_by_superfamily), which must exist."""
    if (input_path is None) == (prompt is None):
        raise ValueError("give either --prompt TEXT or --input FILE (tasks JSONL / Alpaca JSON / shards manifest)")
    if prompt is not None:
        rows = [{"id": "prompt", "instruction": prompt, "input": ""}]
    elif input_path.endswith("manifest.json"):
        from megatron_p2t.evaluation.text import split_records
        rows = [{"id": k, "instruction": m.get("instruction", ""), "input": m.get("input", ""), "reference": t,
                 "task": m.get("task", "")} for k, _, t, m in split_records(input_path, split)]
        if not rows:
            raise ValueError(f"{input_path}: split {split!r} is empty")
    else:
        with open(input_path) as f:
            text = f.read()
        raw = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines()
                                                                        if l.strip()]
        rows = []
        for i, r in enumerate(raw):
            if not isinstance(r, dict) or not (r.get("instruction") or r.get("input")):
                raise ValueError(f"{input_path}: row {i} needs an instruction (and optionally input, output, id)")
            rows.append({"id": str(r.get("id") or r.get("accession") and f"{r['accession']}_{r.get('task', i)}"
                                   or f"row{i}"),
                         "instruction": r.get("instruction", ""), "input": r.get("input", ""),
                         **({"reference": r["output"]} if r.get("output") else {}),
                         **({"task": r["task"]} if r.get("task") else {})})
    if only:
        have = Counter(r.get("task", "") for r in rows)
        if set(only) - set(have):
            raise ValueError(f"{input_path or '--prompt'}: no rows of task(s) {sorted(set(only) - set(have))}; "
                             f"it has {dict(have)}")
        rows = [r for r in rows if r.get("task") in only]
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError(f"{input_path or '--prompt'}: row ids repeat; give each row its own id")
    return [dict(r, id=f"{r['id']}#s{k}" if num_samples > 1 else r["id"]) for r in rows for k in range(num_samples)]


def load(model_dir: str, dtype, device):
    """(LlamaForCausalLM, tokenizer, end token id) from an export or an HF directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    info_file = os.path.join(model_dir, "megatron_p2t.json")
    info = json.load(open(info_file)) if os.path.exists(info_file) else {}
    if info and not info.get("decoder_only"):
        raise ValueError(f"{model_dir}: an export of a protein-to-text model (encoder + connector); "
                         f"`megatron-p2t generate` writes its descriptions, generate-protein needs a decoder-only one")
    llama_dir = os.path.join(model_dir, "llama") if info else model_dir
    tok_dir = os.path.join(model_dir, "tokenizer") if info else model_dir
    for d, what in ((llama_dir, "config.json"), (tok_dir, "tokenizer_config.json")):
        if not os.path.exists(os.path.join(d, what)):
            raise FileNotFoundError(f"{d}: no {what} -- pass an `export` directory of a decoder-only run, or an HF "
                                    f"LlamaForCausalLM directory with its tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    end = tok.convert_tokens_to_ids(info["text_end"]) if info.get("text_end") else tok.eos_token_id
    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=dtype).to(device).eval()
    return model, tok, end


def run(model_dir: str, out_path: str, input_path: Optional[str] = None, prompt: Optional[str] = None,
        split: str = "test", only_tasks: Optional[List[str]] = None, num_samples: int = 1, batch_size: int = 8,
        temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, num_beams: int = 1, sample: bool = True, seed: int = 0,
        max_new_tokens: int = 512, repetition_penalty: float = 1.0, device=None) -> dict:
    import torch
    from tqdm import tqdm
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    items = tasks(input_path, prompt, num_samples, split, only_tasks)
    done = done_ids(out_path, key="id")
    todo = [x for x in items if x["id"] not in done]
    grid = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    model, tok, end = load(model_dir, torch.bfloat16 if device.startswith("cuda") else torch.float32, device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    counts = Counter()
    with open(out_path, "a") as f, tqdm(total=len(items), initial=len(items) - len(todo), unit="sample") as bar:
        for batch in grid:
            if all(r["id"] in done for r in batch):
                continue
            texts = [" ".join(x for x in (r["instruction"], r["input"]) if x) for r in batch]
            ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attn = torch.zeros_like(input_ids)
            for j, x in enumerate(ids):               # left padding: every row continues from its last token
                input_ids[j, width - len(x):], attn[j, width - len(x):] = torch.tensor(x), 1
            torch.manual_seed(zlib.crc32(json.dumps([seed, [r["id"] for r in batch]]).encode()))
            kw = dict(do_sample=sample and num_beams == 1, num_beams=num_beams, max_new_tokens=max_new_tokens,
                      eos_token_id=end, pad_token_id=pad, repetition_penalty=repetition_penalty)
            if kw["do_sample"]:
                kw.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kw)
            for r, text, o in zip(batch, texts, out[:, width:]):
                if r["id"] in done:
                    continue
                output = tok.decode(o, skip_special_tokens=True).strip()
                row = {"id": r["id"], "prompt": text, "output": output, **read_sequence(text, output),
                       "label": label_in(output), "requested": label_in(text)}
                for k in ("reference", "task"):
                    if k in r:
                        row[k] = r[k]
                row["valid"] = valid_protein(row)
                counts["valid"] += row["valid"]
                counts["with_sequence"] += row["sequence"] is not None
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(sum(r["id"] not in done for r in batch))
    return {"samples": len(items), "generated": len(todo), "skipped_already_done": len(items) - len(todo),
            "with_sequence": counts["with_sequence"], "valid": counts["valid"]}
