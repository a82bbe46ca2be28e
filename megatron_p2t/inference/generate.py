"""`megatron-p2t generate`: descriptions for proteins from a FASTA file or a split of shards, with the exported
model (transformers + torch). Output is JSONL, one row per protein (per question for QA samples, which carry
the question), flushed per batch; a restart skips the rows already written (a row cut short by a crash is
dropped and redone)."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple


def questions(key: str, seq: str, meta: dict) -> List[Tuple[str, str, str, dict]]:
    """A QA sample's questions, one item each (`KEY#qN`): the conversation up to the question (earlier answers
    as the reference gives them), the reference answer, and the question itself in the meta."""
    from megatron_p2t.data.instruct import ROLES
    turns, out = meta["conversations"], []
    for j, t in enumerate(turns):
        if ROLES.get(t.get("from") or t.get("role")) == "assistant" and j:
            q = turns[j - 1]
            out.append((f"{key}#q{len(out) + 1}", seq, t.get("value", t.get("content", "")),
                        {"conversations": turns[:j], "question": q.get("value", q.get("content", ""))}))
    return out


def inputs(path: str, split: str = "test") -> List[Tuple[str, str, str, dict]]:
    """(id, sequence, reference or None, meta) from a FASTA file or a shards manifest.json; a QA sample gives
    one item per question."""
    if path.endswith(".json"):
        from megatron_p2t.evaluation.text import split_records
        rows = split_records(path, split)
        if not rows:
            raise ValueError(f"{path}: split {split!r} is empty")
        return [item for k, s, t, m in rows
                for item in (questions(k, s, m) if m.get("conversations") else [(k, s, t, m)])]
    from data_tools.records import check_sequence
    from data_tools.readers.rows import iter_fasta, parse_fasta_header
    out = []
    for line, header, seq in iter_fasta(path):
        h = parse_fasta_header(header)
        meta = {k: h[k] for k in ("name", "organism") if h.get(k)}
        out.append((h["accession"], check_sequence(seq, path, h["accession"], line), None, meta))
    return out


def done_ids(out_path: str, key: str = "accession") -> set:
    """The rows already in out_path (their `key`s), after dropping a last row cut short by a crash."""
    if not os.path.exists(out_path):
        return set()
    good, ids = [], set()
    with open(out_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a row cut short by an interruption: everything before it stands
            good.append(line if line.endswith("\n") else line + "\n")
            ids.add(row[key])
    with open(out_path + ".tmp", "w") as f:
        f.writelines(good)
    os.replace(out_path + ".tmp", out_path)
    return ids


def structures_for(items, input_path: str, split: str, structures: Optional[str]) -> dict:
    """id -> (coords [L, 3], mask [L]) for a structure-aware model: from the shards' KEY.coords.npy (a manifest
    input), or read from `structures` (a directory or tar of PDB/mmCIF/AlphaFold files, data_tools/structures.py)
    for a FASTA. A protein without one is described from its sequence alone (counted)."""
    from data_tools import structures as st
    out = {}
    if input_path.endswith(".json"):
        from megatron_p2t.data.shards import split_samples
        for s in split_samples(input_path, split):
            if "coords.npy" in s:
                out[s["__key__"]] = (st.load_npy(s["coords.npy"]), st.load_npy(s["coords_mask.npy"]))
        return {k: out.get(k.split("#")[0]) for k, *_ in items}
    if structures is None:
        return {}
    source = st.StructureSource(structures)
    for acc, seq, _, _ in items:
        found = source.find(acc)
        if found is not None:
            s = st.read_structure(found[0], found[1], acc, seq, found[2])
            out[acc] = (s.coords, s.mask)
    return out


def run(model_dir: str, input_path: str, out_path: str, split: str = "test", batch_size: int = 8,
        num_beams: int = 1, max_new_tokens: int = 256, device=None, with_name: bool = True,
        with_taxon: bool = True, structures: Optional[str] = None) -> dict:
    """structures: for a model with the structure-aware encoder and a FASTA input, the directory (or tar) of
    structure files named by accession; shards carry their own."""
    import torch
    from tqdm import tqdm

    from megatron_p2t.inference.model import Prot2TextForGeneration
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    items = inputs(input_path, split)
    done = done_ids(out_path)
    todo = [x for x in items if x[0] not in done]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = Prot2TextForGeneration.from_pretrained(model_dir, dtype=dtype, device=device)
    reads_structure = hasattr(model.esm, "structure")
    if structures is not None and not reads_structure:
        from megatron_p2t.config import ConfigError
        raise ConfigError(f"--structures {structures}: {model_dir} has no structure-aware encoder "
                         f"(model.encoder=esm2_structure) to read them")
    found = structures_for(todo, input_path, split, structures) if reads_structure else {}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    todo.sort(key=lambda x: len(x[1]))  # similar lengths per batch: less padding
    with open(out_path, "a") as f, tqdm(total=len(items), initial=len(items) - len(todo), unit="protein") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            metas = [{k: v for k, v in m.items() if (k == "name" and with_name) or
                      (k in ("organism", "taxon") and with_taxon) or k in ("instruction", "conversations")}
                     for _, _, _, m in batch]
            preds = model.generate([s for _, s, _, _ in batch], metas, num_beams=num_beams,
                                   max_new_tokens=max_new_tokens,
                                   structures=[found.get(k) for k, *_ in batch] if reads_structure else None)
            for (acc, seq, ref, meta), p in zip(batch, preds):
                row = {"accession": acc, "prediction": p, "length": len(seq)}
                if reads_structure:
                    row["structure"] = found.get(acc) is not None
                if "question" in meta:
                    row["question"] = meta["question"]
                if ref is not None:
                    row["reference"] = ref
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    out = {"proteins": len(items), "generated": len(todo), "skipped_already_done": len(items) - len(todo)}
    if reads_structure:
        out["without_structure"] = sum(found.get(k) is None for k, *_ in todo)
    return out
