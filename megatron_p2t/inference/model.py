"""The exported model, rebuilt with transformers + torch alone (no megatron-core, no DeepSpeed).

`Prot2TextForGeneration.from_pretrained(dir)` reads what `megatron-p2t export` writes: esm/ (EsmModel),
projector/ (fc1/fc2 + config) or connector/ (Protein2Text's resampler + mlp2x_gelu, hf/connector.py), llama/
(LlamaForCausalLM with LoRA merged), tokenizer/ (with the chat template) and megatron_p2t.json (placeholder
token, system prompt, ESM layer, connector); or Prot2Text-V2's published layout (`from_p2tv2`: the released
model, or `export --format p2tv2`). The connector's vectors (one per ESM token for the projector, a fixed number
of latents for the resampler) replace the placeholder tokens' embeddings; generation runs LLaMA's own KV-cached
greedy or beam search on those embeddings.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from megatron_p2t import parts
from megatron_p2t.checkpoint import p2tv2
from megatron_p2t.data import esm_alphabet
from megatron_p2t.data.instruct import SYSTEM_PROMPT, InstructConfig, PromptBuilder
from megatron_p2t.data.text_tokenizer import LLAMA3_SPECIAL_BASE, llama3_special_tokens
from megatron_p2t.hf.connector import Projector  # noqa: F401  (its home before hf_connector held it)
from megatron_p2t.models.parts_config import ResamplerConfig

def _is_p2tv2(path: str) -> bool:
    f = os.path.join(path, "config.json")
    return os.path.exists(f) and json.load(open(f)).get("model_type") == p2tv2.MODEL_TYPE


class Prot2TextForGeneration(nn.Module):
    def __init__(self, esm, connector: nn.Module, llama, tokenizer, info: dict):
        """connector: the inference form of the part info["connector"] names (hf/connector.py for the built-in
        ones; Prot2Text-V2's Projector when info has none, as exports made before model.connector)."""
        super().__init__()
        self.connector_spec = parts.connector(info.get("connector", "mlp"))
        self.esm, self.connector, self.llama, self.tokenizer, self.info = esm, connector, llama, tokenizer, info
        if info.get("esm_final_norm") is False:
            # export wrote the ESM layers up to the one the connector reads: their output, without the final norm
            esm.encoder.emb_layer_norm_after = None
        self.placeholder_id = tokenizer.convert_tokens_to_ids(info["placeholder_token"])
        self.eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        # the published model pads with <|reserved_special_token_0|> (LLaMA-3.1's 128002) and stops at <|eot_id|>
        pad = tokenizer.convert_tokens_to_ids(info["pad_token"]) if info.get("pad_token") else None
        self.pad_id = pad if pad is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                   else self.eot_id)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer, EsmModel
        if _is_p2tv2(path):
            return cls.from_p2tv2(path, dtype, device)
        info_file = os.path.join(path, "megatron_p2t.json")
        info = json.load(open(info_file)) if os.path.exists(info_file) else {}
        parts.import_parts(info.get("imports"))            # the modules that register a part of the user's
        adapter = parts.connector(info.get("connector", "mlp")).adapter   # exports before model.connector: mlp
        for part in ("esm", adapter.directory, "llama", "tokenizer", "megatron_p2t.json"):
            if not os.path.exists(os.path.join(path, part)):
                raise FileNotFoundError(f"{path}: no {part} -- not a `megatron-p2t export` directory")
        from transformers.utils import logging as hf_logging
        before = hf_logging.get_verbosity()
        if info.get("esm_final_norm") is False:   # esm/ has no final norm on purpose: no "missing weights" report
            hf_logging.set_verbosity_error()
        try:
            esm = EsmModel.from_pretrained(os.path.join(path, "esm"), add_pooling_layer=False, dtype=dtype)
        finally:
            hf_logging.set_verbosity(before)
        if info.get("encoder") and parts.encoder(info["encoder"]).structure:
            from megatron_p2t.hf.structure import DistanceBias
            esm.structure = DistanceBias.from_pretrained(os.path.join(path, "structure"), esm.config.hidden_size)
        connector = adapter.load(os.path.join(path, adapter.directory))
        # LlamaForCausalLM, or Qwen2MoeForCausalLM for a mixture-of-experts decoder (model.decoder=llama_moe)
        llama = AutoModelForCausalLM.from_pretrained(os.path.join(path, "llama"), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        return cls(esm, connector.to(dtype), llama, tok, info).to(device).eval()

    @classmethod
    def from_p2tv2(cls, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """Prot2Text-V2's published layout (the authors' Esm2LlamaInstructForCausalLM), e.g. the released model or
        `megatron-p2t export --format p2tv2`: the same parts under esm_encoder. / adapter. / llama_decoder."""
        from transformers import AutoTokenizer, EsmModel, LlamaForCausalLM

        llama_cfg, esm_cfg, adapter, placeholder = p2tv2.hf_configs(path)
        ck = p2tv2.check(path)

        def part(prefix):
            return {n[len(prefix):]: ck.get(n) for n in ck.keys() if n.startswith(prefix)}
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the target dtype: the 11B release is 22 GB in bf16, 44 in fp32
        try:
            esm = EsmModel(esm_cfg, add_pooling_layer=False)
            projector = Projector(adapter["input_dim"], adapter["intermediate_dim"], adapter["output_dim"])
            llama = LlamaForCausalLM(llama_cfg)
        finally:
            torch.set_default_dtype(before)
        missing, unexpected = esm.load_state_dict(part(p2tv2.ESM), strict=False)
        unexpected = [u for u in unexpected if not p2tv2.unused(p2tv2.ESM + u)]  # rotary buffers: recomputed
        if unexpected or [m for m in missing if not p2tv2.unused(p2tv2.ESM + m)]:
            raise ValueError(f"{path}: esm_encoder weights do not fit esm_config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        projector.load_state_dict({k: v for k, v in part(p2tv2.ADAPTER).items() if k.startswith(("fc1.", "fc2."))})
        missing, unexpected = llama.load_state_dict(part(p2tv2.LLAMA), strict=False)
        if unexpected or [m for m in missing if not (llama_cfg.tie_word_embeddings and m == "lm_head.weight")]:
            raise ValueError(f"{path}: llama_decoder weights do not fit llama_config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        tok = AutoTokenizer.from_pretrained(path)
        info = {"placeholder_token": tok.convert_ids_to_tokens(placeholder), "system_prompt": SYSTEM_PROMPT,
                "missing_fields": "unknown", "pad_token": llama3_special_tokens()[128002 - LLAMA3_SPECIAL_BASE],
                "esm_output_layer": -1, "format": "p2tv2"}
        return cls(esm.to(dtype), projector.to(dtype), llama.to(dtype), tok, info).to(device).eval()

    def protein_states(self, protein_ids: torch.Tensor, protein_mask: torch.Tensor, coords=None, known=None):
        """(vectors [b, n, llm] for the prompt, mask [b, n]: the real ones). coords [b, n, 3] / known [b, n] per
        ESM token: the structure-aware encoder's input (None: sequence only)."""
        layer = -1 if self.info.get("esm_final_norm") is False else int(self.info.get("esm_output_layer", -1))
        if hasattr(self.esm, "structure") and coords is not None:
            from megatron_p2t.hf.structure import run_esm
            h = run_esm(self.esm, self.esm.structure, protein_ids, protein_mask, coords, known)
        else:
            out = self.esm(input_ids=protein_ids, attention_mask=protein_mask.long(),
                           output_hidden_states=layer != -1)
            h = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        return self.connector_spec.adapter.run(self.connector, h, protein_mask)

    def slots(self, residues: int) -> int:
        """Prompt positions a protein of this many residues fills (the connector decides)."""
        from megatron_p2t.config import ModelConfig
        res = ResamplerConfig(**self.info["resampler"]) if "resampler" in self.info else ResamplerConfig()
        return self.connector_spec.slots(residues, ModelConfig(connector=self.connector_spec.name, resampler=res))

    def embed(self, input_ids, protein_ids, protein_mask, coords=None, known=None) -> torch.Tensor:
        """Token embeddings with the placeholders replaced by the connector's vectors, proteins in the order
        their placeholders appear (row-major)."""
        emb = self.llama.get_input_embeddings()(input_ids)
        slots = input_ids == self.placeholder_id
        vectors, real = self.protein_states(protein_ids, protein_mask, coords, known)
        prot = vectors[real].to(emb.dtype)
        if int(slots.sum()) != prot.shape[0]:
            raise ValueError(f"{int(slots.sum())} placeholder tokens for {prot.shape[0]} protein vectors")
        return emb.masked_scatter(slots.unsqueeze(-1).expand_as(emb), prot)

    def forward(self, input_ids, protein_ids, protein_mask, attention_mask=None, position_ids=None, coords=None,
                known=None):
        return self.llama(inputs_embeds=self.embed(input_ids, protein_ids, protein_mask, coords, known),
                          attention_mask=attention_mask, position_ids=position_ids).logits

    def prompts(self, sequences: Sequence[str], metas: Optional[Sequence[dict]] = None):
        """Left-padded prompt ids + attention mask, and the ESM batch, for these sequences. A meta with
        `conversations` (turns ending with a question) asks that question; otherwise the function prompt."""
        # exports made before missing_fields existed were trained with absent fields left out
        icfg = InstructConfig(system_prompt=self.info["system_prompt"],
                              missing_fields=self.info.get("missing_fields", "omit"))
        builder = PromptBuilder(self.tokenizer, icfg,
                                self.info["placeholder_token"])
        metas = metas or [{} for _ in sequences]
        max_res = int(self.info.get("max_protein_residues", 1021))
        prots = [esm_alphabet.encode(s[:max_res]) for s in sequences]
        ids = [builder.conversation_prompt_ids(m["conversations"], self.slots(len(p) - 2)) if m.get("conversations")
               else builder.prompt_ids(m, "", self.slots(len(p) - 2), train=False) for m, p in zip(metas, prots)]
        width, plen = max(map(len, ids)), max(map(len, prots))
        pad = self.pad_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attn = torch.zeros(len(ids), width, dtype=torch.long)
        protein_ids = torch.full((len(prots), plen), esm_alphabet.PAD, dtype=torch.long)
        for i, (t, p) in enumerate(zip(ids, prots)):
            input_ids[i, width - len(t):], attn[i, width - len(t):] = torch.tensor(t), 1
            protein_ids[i, :len(p)] = torch.from_numpy(np.asarray(p))
        return input_ids, attn, protein_ids, protein_ids != esm_alphabet.PAD

    @torch.no_grad()
    def generate(self, sequences: Sequence[str], metas: Optional[Sequence[dict]] = None, num_beams: int = 1,
                 max_new_tokens: int = 256, structures: Optional[Sequence] = None) -> List[str]:
        """structures: per sequence (coords [L, 3], mask [L]) or None, for a structure-aware encoder."""
        dev = next(self.parameters()).device
        input_ids, attn, pids, pmask = (x.to(dev) for x in self.prompts(sequences, metas))
        coords = known = None
        if structures is not None and any(s is not None for s in structures):
            coords = torch.zeros(*pids.shape, 3, device=dev)
            known = torch.zeros(pids.shape, dtype=torch.bool, device=dev)
            for i, st in enumerate(structures):
                if st is not None:
                    n = min(len(st[0]), pids.shape[1] - 2)     # cropped as the sequence
                    coords[i, 1:1 + n] = torch.as_tensor(st[0][:n], device=dev)
                    known[i, 1:1 + n] = torch.as_tensor(st[1][:n], device=dev)
        embeds = self.embed(input_ids, pids, pmask, coords, known)
        out = self.llama.generate(inputs_embeds=embeds, attention_mask=attn, num_beams=num_beams,
                                  do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eot_id,
                                  pad_token_id=self.pad_id)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
