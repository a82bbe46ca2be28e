"""Protein families whose function text is fixed by the sequence: a learnability check needs a dataset where the
answer is in the protein, which random towers cannot supply on real held-out SwissProt entries.

Each family has its own amino-acid composition and ancestor; members are the ancestor with point substitutions
drawn from that composition. Each family gets one real function text. Member 0 of every family is held out as
valid, member 1 as test, so held-out sequences are new sequences of families seen in training."""
from __future__ import annotations

import os
import random
from typing import Dict, List, Sequence

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def write_families(out: str, texts: Sequence[str], families: int = 40, members: int = 12,
                   substitution: float = 0.15, seed: int = 0, lengths=(80, 200)) -> Dict[str, str]:
    """FASTA + annotation TSV + split lists under out; returns their paths (data_tools build's inputs)."""
    if len(set(texts)) < families:
        raise ValueError(f"need {families} distinct texts, got {len(set(texts))}")
    texts = list(dict.fromkeys(texts))[:families]
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"{k}.txt") for k in ("train", "valid", "test")}
    paths.update(fasta=os.path.join(out, "families.fasta"), annotations=os.path.join(out, "families.tsv"))
    lists: Dict[str, List[str]] = {"train": [], "valid": [], "test": []}
    with open(paths["fasta"], "w") as fa, open(paths["annotations"], "w") as ann:
        ann.write("accession\tfunction\n")
        for f, text in enumerate(texts):
            weights = [rng.gammavariate(0.5, 1.0) for _ in AMINO]
            ancestor = rng.choices(AMINO, weights=weights, k=rng.randint(*lengths))
            for m in range(members):
                seq = "".join(rng.choices(AMINO, weights=weights)[0] if rng.random() < substitution else a
                              for a in ancestor)
                acc = f"FAM{f:03d}M{m:02d}"
                fa.write(f">{acc}\n{seq}\n")
                ann.write(f"{acc}\t{text}\n")
                lists["valid" if m == 0 else "test" if m == 1 else "train"].append(acc)
    for split, accs in lists.items():
        with open(paths[split], "w") as f:
            f.write("\n".join(accs) + "\n")
    return paths


def write_family_qa(out: str, fasta: str) -> str:
    """Protein2Text-style conversations for write_families' proteins (same accessions, so the same split lists
    apply), answers fixed by the family: "Is it an enzyme?" (yes for even families) and "Which family?"."""
    import json
    rows, acc = [], None
    with open(fasta) as f:
        for line in f:
            if line.startswith(">"):
                acc = line[1:].strip()
                continue
            fam = int(acc[3:6])
            rows.append({"id": acc, "protein": line.strip(), "conversations": [
                {"from": "human", "value": "<protein>\nIs it an enzyme?"},
                {"from": "gpt", "value": "Yes." if fam % 2 == 0 else "No."},
                {"from": "human", "value": "Which family is it from?"},
                {"from": "gpt", "value": f"Family {fam}."}]})
    path = os.path.join(out, "qa.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def family_members(families: int = 8, members: int = 12, substitution: float = 0.15, seed: int = 0,
                   lengths=(40, 80)):
    """[(family, member, sequence)] of write_families' kind: each family its own composition and ancestor."""
    rng = random.Random(seed)
    out = []
    for f in range(families):
        weights = [rng.gammavariate(0.5, 1.0) for _ in AMINO]
        ancestor = rng.choices(AMINO, weights=weights, k=rng.randint(*lengths))
        for m in range(members):
            out.append((f, m, "".join(rng.choices(AMINO, weights=weights)[0] if rng.random() < substitution else a
                                      for a in ancestor)))
    return out


def write_uniref(path: str, members, long_extra: int = 0) -> str:
    """UniRef50-style gzipped FASTA of family_members' proteins (headers as UniProt writes them, 60 residues a
    line); long_extra > 0 adds one protein of that many residues (longer than a row)."""
    import gzip
    rng = random.Random(1)
    rows = [(f"UniRef50_F{f:03d}M{m:02d}", f"Family {f} protein", seq) for f, m, seq in members]
    if long_extra:
        rows.append(("UniRef50_LONG00001", "Titin-like protein", "".join(rng.choices(AMINO, k=long_extra))))
    with gzip.open(path, "wt") as out:
        for i, (cid, name, seq) in enumerate(rows):
            out.write(f">{cid} {name} n={1 + i % 7} Tax=Homo sapiens TaxID=9606 RepID={cid[9:]}_HUMAN\n")
            out.write("".join(seq[j:j + 60] + "\n" for j in range(0, len(seq), 60)))
    return path


def write_family_tasks(out: str, members, name=lambda f: f"Synthetic family {f} superfamily") -> Dict[str, str]:
    """ProLLaMA's two tasks per protein (data_tools.tasks.rows_of) as Alpaca JSON, and split lists holding out
    member 0 (valid) and member 1 (test) of every family."""
    import json
    from types import SimpleNamespace
    from data_tools.tasks import rows_of
    os.makedirs(out, exist_ok=True)
    rows, lists = [], {"train": [], "valid": [], "test": []}
    for f, m, seq in members:
        acc = f"F{f:03d}M{m:02d}"
        rows += rows_of(SimpleNamespace(sequence=seq, accession=acc), name(f), ("generate", "determine"))
        lists["valid" if m == 0 else "test" if m == 1 else "train"].append(acc)
    paths = {k: os.path.join(out, f"{k}.txt") for k in lists}
    for k, accs in lists.items():
        with open(paths[k], "w") as fh:
            fh.write("\n".join(accs) + "\n")
    paths["tasks"] = os.path.join(out, "tasks.json")
    with open(paths["tasks"], "w") as fh:
        json.dump(rows, fh)
    return paths


# Folds of tests/synthetic.write_folds: (turn per residue in degrees, rise per residue, radius), all with C-alpha
# neighbours ~3.8 A apart. The i,i+3 distances differ (alpha 5.0 A, 3-10 6.0 A, strand 10 A).
FOLDS = {"alpha helix": (100.0, 1.5, 2.3), "3-10 helix": (120.0, 2.0, 1.9), "beta strand": (180.0, 3.2, 1.0)}


def fold_coords(fold: str, n: int, rng: random.Random, noise: float = 0.2):
    """C-alpha trace [n, 3] of a regular fold (a helix of the FOLDS geometry), randomly rotated and placed."""
    import numpy as np
    turn, rise, radius = FOLDS[fold]
    t = np.radians(turn) * np.arange(n)
    xyz = np.stack([radius * np.cos(t), radius * np.sin(t), rise * np.arange(n)], 1)
    q, _ = np.linalg.qr(np.array([[rng.gauss(0, 1) for _ in range(3)] for _ in range(3)]))
    nr = np.random.default_rng(rng.randrange(1 << 30))
    return (xyz @ q.T + nr.normal(0, 20, 3) + nr.normal(0, noise, (n, 3))).astype(np.float32)


def write_pdb(path: str, accession: str, sequence: str, coords, plddt=None) -> None:
    """A C-alpha-only model in AlphaFold DB's PDB layout (TITLE, pLDDT in the B-factor column, END)."""
    import gemmi
    lines = [f"TITLE     ALPHAFOLD MONOMER V2.0 PREDICTION FOR {accession}"]
    for i, (aa, (x, y, z)) in enumerate(zip(sequence, coords)):
        name = gemmi.expand_one_letter(aa, gemmi.ResidueKind.AA) or "UNK"
        b = 90.0 if plddt is None else float(plddt[i])
        lines.append(f"ATOM  {i + 1:5d}  CA  {name} A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00{b:6.2f}           C")
    lines += ["TER", "END"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_folds(out: str, texts: Sequence[str], per_fold: int = 24, seed: int = 0, lengths=(30, 50)):
    """Proteins whose function text is fixed by their fold alone: every sequence is drawn from one amino-acid
    composition, each fold (FOLDS) has its own text, and each protein an AlphaFold-style model file of its fold.
    Per fold, members 0-3 are held out as valid, 4-11 as test. Returns build inputs: fasta, annotations, the
    structure directory, split lists."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "structures"), exist_ok=True)
    paths = {k: os.path.join(out, f"{k}.txt") for k in ("train", "valid", "test")}
    paths.update(fasta=os.path.join(out, "folds.fasta"), annotations=os.path.join(out, "folds.tsv"),
                 structures=os.path.join(out, "structures"))
    lists: Dict[str, List[str]] = {"train": [], "valid": [], "test": []}
    with open(paths["fasta"], "w") as fa, open(paths["annotations"], "w") as ann:
        ann.write("accession\tfunction\n")
        for f, (fold, text) in enumerate(zip(FOLDS, texts)):
            for m in range(per_fold):
                acc = f"F{f}X{m:03d}"
                seq = "".join(rng.choices(AMINO, k=rng.randint(*lengths)))
                fa.write(f">{acc}\n{seq}\n")
                ann.write(f"{acc}\t{text}\n")
                write_pdb(os.path.join(paths["structures"], f"AF-{acc}-F1-model_v4.pdb"), acc, seq,
                          fold_coords(fold, len(seq), rng))
                lists["valid" if m < 4 else "test" if m < 12 else "train"].append(acc)
    for split, accs in lists.items():
        with open(paths[split], "w") as f:
            f.write("\n".join(accs) + "\n")
    return paths


def make_llama_moe(path: str, experts: int = 4, top_k: int = 1, seed: int = 5, init_std: float = 0.1,
                   **llama_kw) -> str:
    """A tiny mixture-of-experts decoder in the Qwen2-MoE layout our export writes (checkpoint/llama_moe_hf.py),
    with every expert and the router drawn at random, so experts differ (an upcycled one's are all alike, and a
    mistake in which rank holds which expert would not show)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from megatron_p2t.checkpoint.llama_moe_hf import hf_config
    from megatron_p2t.models.parts_config import MoEConfig
    from megatron_p2t.models.tiny import make_llama
    dense = make_llama(os.path.join(path, "dense"), seed=seed, init_std=init_std, max_shard_size="50MB", **llama_kw)
    cfg = hf_config(AutoConfig.from_pretrained(dense), MoEConfig(experts=experts, top_k=top_k))
    tensors = {k: v for k, v in load_file(os.path.join(dense, "model.safetensors")).items() if ".mlp." not in k}
    g = torch.Generator().manual_seed(seed + 1)
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        tensors[p + "gate.weight"] = torch.randn(experts, h, generator=g) * init_std
        for e in range(experts):
            for name, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
                tensors[f"{p}experts.{e}.{name}.weight"] = torch.randn(*shape, generator=g) * init_std
        tensors[p + "shared_expert.gate_proj.weight"] = torch.zeros(0, h)
        tensors[p + "shared_expert.up_proj.weight"] = torch.zeros(0, h)
        tensors[p + "shared_expert.down_proj.weight"] = torch.zeros(h, 0)
        tensors[p + "shared_expert_gate.weight"] = torch.zeros(1, h)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(path)
    return path
