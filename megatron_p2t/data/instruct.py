"""Stage 2 batches: chat prompts with one placeholder per ESM token, labels on the answers only, packed rows.

Prompts go through the tokenizer's own chat template (LLaMA-3.1's). Three sample shapes share the path:
- SwissProt-style entries: user turn `Protein name: ...; Taxon: ...; Sequence embeddings: <ph>*(L+2)`, the name
  and the taxon each dropped with probability `drop_name` / `drop_taxon` in training (Prot2Text-V2: 0.8); a
  dropped or absent field reads `unknown`, as the authors' collater writes it and their model was trained on
  (`missing_fields: omit` leaves it out instead);
- Mol-Instructions: the instruction, then `Sequence embeddings: <ph>*(L+2)`;
- Protein2Text-style QA: a `conversations` list (human/gpt turns); the protein goes where the first human turn
  says `<protein>` (or before it); every assistant turn is learned;
- decoder-only recipes (`instruct.template: plain`, ProLLaMA): no chat template and no placeholder, the prompt is
  `<bos>instruction input` (Alpaca rows, the protein written in the text as `Seq=<...>`).
The answer of single-turn samples is the loader's text tokens (function text + <|eot_id|>, already capped at
max_text_tokens). Targets are shifted here: position t predicts token t+1, and the last token of a sample
predicts nothing, so a sample's loss does not depend on what is packed after it.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# Prot2Text-V2's system message (theirs ends with a space, which LLaMA-3.1's chat template trims away)
SYSTEM_PROMPT = ("You are a scientific assistant specialized in protein function predictions. Given the sequence "
                 "embeddings and other information of a protein, describe its function clearly and concisely in "
                 "professional language.")
MISSING_FIELDS = ("unknown", "omit")
TEMPLATES = {"chat": "the tokenizer's chat template, system prompt, protein placeholders",
             "plain": "<bos>instruction input (ProLLaMA), no chat template, no placeholder"}
PROTEIN_MARK = "<protein>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass
class InstructConfig:
    """Stage 2 (instruction tuning)."""
    system_prompt: str = SYSTEM_PROMPT
    drop_name: float = 0.8             # training only; generation always shows what the record has
    drop_taxon: float = 0.8
    missing_fields: str = "unknown"    # a dropped or absent name/taxon: "unknown" (Prot2Text-V2) or "omit"
    pack: bool = True                  # several samples per row, attention confined to each
    pack_length: Optional[int] = 2048  # row capacity in tokens (at least the longest sample of the batch)
    mix: List[Dict] = dataclasses.field(default_factory=list)   # [{manifest: ..., weight: ...}, ...] extra sources
    main_weight: float = 1.0           # data.manifest's weight when mixing
    init_from: Optional[str] = None    # a stage-1 run directory (or step directory): its trained projector
    connector_lr: Optional[float] = None   # None: train.lr (which the LoRA adapters use); was projector_lr
    template: str = "chat"             # chat: the tokenizer's chat template; plain: `<bos>instruction input`


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray          # prompt + answer token ids, placeholders expanded
    targets: np.ndarray      # next-token targets, -100 where nothing is learned
    n_protein: int


class PromptBuilder:
    def __init__(self, tok, cfg: InstructConfig, placeholder_token: Optional[str], seed: int = 0,
                 end_token: str = "<|eot_id|>"):
        """placeholder_token None: a decoder-only recipe (no protein slots). end_token: what ends every answer
        (data.text_end)."""
        if cfg.missing_fields not in MISSING_FIELDS:
            raise ValueError(f"instruct.missing_fields={cfg.missing_fields!r}: choose one of {MISSING_FIELDS}")
        if cfg.template not in TEMPLATES:
            raise ValueError(f"instruct.template={cfg.template!r}: choose one of {sorted(TEMPLATES)}")
        self.tok, self.cfg, self.seed = tok, cfg, seed
        self.placeholder = self.placeholder_text = None
        if placeholder_token is not None:
            self.placeholder = tok.convert_tokens_to_ids(placeholder_token)
            if self.placeholder is None or self.placeholder == tok.unk_token_id:
                raise ValueError(f"placeholder token {placeholder_token!r} is not in the tokenizer")
            self.placeholder_text = placeholder_token
        elif cfg.template != "plain":
            raise ValueError("a decoder-only recipe (no protein placeholder) builds plain prompts: set "
                             "instruct.template=plain")
        self.eot = tok.convert_tokens_to_ids(end_token)

    def _encode(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def user_turn(self, meta: dict, key: str, epoch: int, train: bool) -> str:
        """The first user message, with a single placeholder standing for the protein."""
        prot = f"Sequence embeddings: {self.placeholder_text}"
        if meta.get("instruction"):
            return f"{meta['instruction']}\n{prot}"
        r = np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode())]) if train else None
        name = meta.get("name")
        if name and train and r.random() < self.cfg.drop_name:
            name = None
        taxon = meta.get("organism") or meta.get("taxon")
        if taxon and train and r.random() < self.cfg.drop_taxon:
            taxon = None
        if self.cfg.missing_fields == "unknown":
            return f"Protein name: {name or 'unknown'}; Taxon: {taxon or 'unknown'}; {prot}"
        return "; ".join([f"Protein name: {name}"] * bool(name) + [f"Taxon: {taxon}"] * bool(taxon) + [prot])

    def _expand(self, ids: List[int], n_protein: int) -> List[int]:
        at = [i for i, t in enumerate(ids) if t == self.placeholder]
        if len(at) != 1:
            raise ValueError(f"the prompt must hold the protein placeholder once, found {len(at)}")
        return ids[:at[0]] + [self.placeholder] * n_protein + ids[at[0] + 1:]

    def prompt_ids(self, meta: dict, key: str, n_protein: int, epoch: int = 0, train: bool = False) -> List[int]:
        """System + user turn + the assistant header: what generation starts from. Plain: `<bos>instruction
        input`, ProLLaMA's prompt (its Alpaca rows: `[Determine superfamily]` + ` Seq=<...>`)."""
        if self.cfg.template == "plain":
            text = " ".join(x for x in (meta.get("instruction"), meta.get("input")) if x)
            if not text:
                raise ValueError(f"sample {key}: the plain template needs an instruction (Alpaca rows: instruction, "
                                 f"input, output)")
            return [self.tok.bos_token_id] + self._encode(text)
        msgs = [{"role": "system", "content": self.cfg.system_prompt},
                {"role": "user", "content": self.user_turn(meta, key, epoch, train)}]
        return self._expand(self._encode(self._render(msgs, True)), n_protein)

    def encode(self, meta: dict, key: str, answer_ids: Sequence[int], n_protein: int, epoch: int,
               train: bool = True) -> Encoded:
        if meta.get("conversations") and self.cfg.template == "plain":
            raise ValueError(f"sample {key}: conversations need the chat template (instruct.template=chat)")
        if meta.get("conversations"):
            ids, learn = self._conversation(meta["conversations"], n_protein)
        else:
            prompt = self.prompt_ids(meta, key, n_protein, epoch, train)
            answer = list(answer_ids)
            if not answer or answer[-1] != self.eot:
                answer.append(self.eot)
            ids, learn = prompt + answer, [False] * len(prompt) + [True] * len(answer)
        ids_a = np.asarray(ids, dtype=np.int64)
        targets = np.full(len(ids), -100, dtype=np.int64)
        learn_next = np.asarray(learn[1:], dtype=bool)
        targets[:-1][learn_next] = ids_a[1:][learn_next]
        return Encoded(ids_a, targets, n_protein)

    def _messages(self, turns: List[dict]) -> List[dict]:
        """System message + the turns as chat messages, the protein placeholder in the first user turn."""
        msgs = [{"role": "system", "content": self.cfg.system_prompt}]
        for i, t in enumerate(turns):
            role = ROLES.get(t.get("from") or t.get("role"))
            if role is None:
                raise ValueError(f"conversation turn {i}: unknown speaker {t.get('from') or t.get('role')!r} "
                                 f"(human/gpt or user/assistant)")
            text = t.get("value") if "value" in t else t.get("content", "")
            if role == "user" and len(msgs) == 1:
                prot = f"Sequence embeddings: {self.placeholder_text}"
                text = text.replace(PROTEIN_MARK, prot) if PROTEIN_MARK in text else f"{prot}\n{text}"
            msgs.append({"role": role, "content": text})
        return msgs

    def conversation_prompt_ids(self, turns: List[dict], n_protein: int) -> List[int]:
        """What generation answers the last (user) turn of a conversation from: the earlier turns as given,
        then the assistant header."""
        return self._expand(self._encode(self._render(self._messages(turns), True)), n_protein)

    def _conversation(self, turns: List[dict], n_protein: int) -> Tuple[List[int], List[bool]]:
        msgs = self._messages(turns)
        ids: List[int] = []
        learn: List[bool] = []
        done = ""
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = self._render(msgs[:j], True)
            piece = self._encode(head[len(done):])
            answer = self._encode(m["content"]) + [self.eot]
            ids += piece + answer
            learn += [False] * len(piece) + [True] * len(answer)
            done = self._render(msgs[:j + 1], False)
        if not any(learn):
            raise ValueError("a conversation without an assistant turn has nothing to learn")
        expanded = self._expand(ids, n_protein)
        at = ids.index(self.placeholder)
        learn = learn[:at] + [False] * n_protein + learn[at + 1:]
        return expanded, learn


def pack_rows(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """First-fit decreasing: sample indices per row, each row's total <= capacity (a longer sample gets a
    row of its own)."""
    rows: List[List[int]] = []
    free: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate_instruct(encoded: List[Encoded], protein_ids: torch.Tensor, protein_mask: torch.Tensor, pad_id: int,
                     pack: bool, pack_length: Optional[int] = None, structure: Optional[tuple] = None
                     ) -> Dict[str, torch.Tensor]:
    """Rows of prompts+answers. Packed: several samples per row, `attention_mask` = segment ids (1.. per
    sample, 0 padding), positions restart per sample. Padded: one sample per row, `attention_mask` None (plain
    causal attention: right padding is never attended to) and `padding_mask` True at the padding, which MoE routing
    leaves out (packed rows' is their segment 0).
    Proteins are reordered to the order their placeholders appear in (row-major), as the splice reads them."""
    lengths = [len(e.ids) for e in encoded]
    rows = pack_rows(lengths, max(pack_length or 0, max(lengths))) if pack else [[i] for i in range(len(encoded))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    n = len(rows)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    targets = np.full((n, width), -100, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    seg = np.zeros((n, width), dtype=np.int64)
    order = []
    for r, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            e, k = encoded[i], lengths[i]
            ids[r, at:at + k], targets[r, at:at + k] = e.ids, e.targets
            pos[r, at:at + k], seg[r, at:at + k] = np.arange(k), j + 1
            at += k
            order.append(i)
    loss_mask = targets != -100
    order_t = torch.tensor(order)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(np.where(loss_mask, targets, 0)),
           "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)), "position_ids": torch.from_numpy(pos),
           "protein_ids": protein_ids[order_t], "protein_mask": protein_mask[order_t], "order": order_t,
           "attention_mask": torch.from_numpy(seg) if pack else None,
           "lengths": torch.tensor([sum(lengths[i] for i in row) for row in rows])}
    if not pack:
        out["padding_mask"] = torch.from_numpy(seg == 0)
    if structure is not None:         # (coords, mask) per ESM token, in the proteins' order
        out["protein_coords"], out["coords_mask"] = structure[0][order_t], structure[1][order_t]
    return out


class PackedLoader:
    """A ProteinTextLoader's batches as rows of token sequences (`encode`: one sample of the batch), packed or one
    per row; its resumable position is the wrapped loader's. Padding samples of a finite pass (valid=False) are
    dropped here, and counted by the loader."""

    def __init__(self, loader):
        self.loader, self.pad_id = loader, loader.text_pad

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        for b in self.loader:
            yield self.convert(b)

    def encode(self, b: dict, i: int) -> Encoded:
        raise NotImplementedError

    def convert(self, b: dict) -> Optional[dict]:
        keep = [i for i, v in enumerate(b["valid"].tolist()) if v]
        if not keep:
            return None
        enc = [self.encode(b, i) for i in keep]
        idx = torch.tensor(keep)
        structure = (b["protein_coords"][idx], b["coords_mask"][idx]) if "protein_coords" in b else None
        out = collate_instruct(enc, b["protein_ids"][idx], b["protein_mask"][idx], self.pad_id, self.pack,
                               self.pack_length, structure)
        out["keys"] = [b["keys"][i] for i in keep]
        return out


class InstructLoader(PackedLoader):
    """Stage-2 batches: each sample's prompt (PromptBuilder) and its answer, the loader's text tokens."""

    def __init__(self, loader, builder: PromptBuilder, cfg: InstructConfig, train: bool = True,
                 slots: Optional[Callable[[int], int]] = None):
        """slots: prompt positions of a protein of n ESM tokens (the connector decides: models/parts_config.py's
        protein_slots); None: one per ESM token."""
        super().__init__(loader)
        self.builder, self.cfg, self.train = builder, cfg, train
        self.slots = slots or (lambda n: n)

    @property
    def pack(self) -> bool:          # the config's, read at each batch (tests switch it between batches)
        return self.cfg.pack

    @property
    def pack_length(self) -> Optional[int]:
        return self.cfg.pack_length

    def encode(self, b: dict, i: int) -> Encoded:
        answer = b["text_ids"][i][b["text_mask"][i]].tolist()
        return self.builder.encode(b["meta"][i], b["keys"][i], answer, self.slots(int(b["protein_mask"][i].sum())),
                                   b["epochs"][i], self.train)


class MixedLoader:
    """Several InstructLoaders drawn by weight, one batch at a time (Mol-Instructions beside SwissProt, ...).
    The draw of step n depends only on (seed, n), so a resumed run draws what the uninterrupted one would."""

    def __init__(self, loaders: Sequence[InstructLoader], weights: Sequence[float], seed: int = 0):
        if len(loaders) != len(weights) or min(weights) <= 0:
            raise ValueError(f"mix weights must be positive, one per source: {list(weights)}")
        self.loaders, self.seed, self.n = list(loaders), seed, 0
        self.p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.pad_id = loaders[0].pad_id

    def state_dict(self) -> dict:
        return {"n": self.n, "sources": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.loaders):
            raise ValueError("the saved position is of a different data mix; restore instruct.mix")
        self.n = int(state["n"])
        for ld, s in zip(self.loaders, state["sources"]):
            ld.load_state_dict(s)

    def __iter__(self):
        its = [iter(ld.loader) for ld in self.loaders]
        while True:
            k = int(np.random.default_rng([self.seed, self.n, 0x313]).choice(len(its), p=self.p))
            self.n += 1
            yield self.loaders[k].convert(next(its[k]))
