"""The published Prot2Text-V2 layout (`Esm2LlamaInstructForCausalLM`, e.g. xiao-fei/Prot2Text-V2-11B-Instruct-hf):

  config.json   model_type "esm2llama_instruct"; esm_config (EsmConfig dict), adapter_config (input_dim,
                intermediate_dim, output_dim, dropout_rate; model_type "modality_adapter"), llama_config
                (LlamaConfig dict), placeholder_id (128003)
  weights       esm_encoder.* (EsmModel, no pooler), adapter.fc1/fc2.{weight,bias} (+ ln1/ln2, unused by its
                forward), llama_decoder.* (LlamaForCausalLM); safetensors, sharded with an index or not

Reading goes through HFDir with these prefixes, so every rank reads only its own TP/PP slice. The adapter is our
projector exactly (fc1 -> GELU -> dropout -> fc2 -> GELU -> dropout -> per-token L2 normalisation).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Dict

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import EsmConfig, LlamaConfig

from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir, canonical
from megatron_p2t.data.text_tokenizer import load_text_tokenizer

MODEL_TYPE = "esm2llama_instruct"
ESM, ADAPTER, LLAMA = "esm_encoder.", "adapter.", "llama_decoder."
# carried through import -> export but never applied: the adapter's deprecated LayerNorms, EsmModel's contact
# head and its rotary buffers (recomputed; saved once for the model or per layer), a pooler if one was saved
UNUSED = ("adapter.ln1.", "adapter.ln2.", "esm_encoder.contact_head.", "esm_encoder.pooler.",
          "esm_encoder.rotary_embeddings.")
ROTARY = "rotary_embeddings.inv_freq"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
EXTRA_FILE = "p2tv2_extra.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_ADAPTER_KEYS = ("input_dim", "intermediate_dim", "output_dim")
ADAPTER_DROPOUT = 0.3  # ModalityAdapterConfig's default dropout_rate, when a config.json leaves it out


def read_config(path: str) -> dict:
    """The composite config.json, checked: names the first key that does not fit the layout."""
    f = os.path.join(path, "config.json")
    if not os.path.exists(f):
        raise CheckpointError(f"{path}: no config.json; expected a Prot2Text-V2 ({MODEL_TYPE}) directory")
    with open(f) as fh:
        c = json.load(fh)
    if c.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{f}: model_type is {c.get('model_type')!r}, expected {MODEL_TYPE!r} "
                              f"(Prot2Text-V2's Esm2LlamaInstructForCausalLM layout)")
    for key, want in (("esm_config", "esm"), ("adapter_config", "modality_adapter"), ("llama_config", "llama")):
        sub = c.get(key)
        if not isinstance(sub, dict):
            raise CheckpointError(f"{f}: {key} is missing or not a mapping; expected the {want} config as a dict")
        if sub.get("model_type", want) != want:
            raise CheckpointError(f"{f}: {key}.model_type is {sub.get('model_type')!r}, expected {want!r}")
    for k in _ADAPTER_KEYS:
        if not isinstance(c["adapter_config"].get(k), int):
            raise CheckpointError(f"{f}: adapter_config.{k} is missing or not an integer")
    a, e, l = c["adapter_config"], c["esm_config"], c["llama_config"]
    if a["input_dim"] != e.get("hidden_size") or a["output_dim"] != l.get("hidden_size"):
        raise CheckpointError(f"{f}: adapter_config input_dim/output_dim = {a['input_dim']}/{a['output_dim']}, "
                              f"expected esm_config.hidden_size/llama_config.hidden_size = "
                              f"{e.get('hidden_size')}/{l.get('hidden_size')}")
    c.setdefault("placeholder_id", 128003)
    return c


def hf_configs(path: str):
    """(LlamaConfig, EsmConfig, adapter dict, placeholder id) of a Prot2Text-V2 directory."""
    c = read_config(path)
    llama = {k: v for k, v in c["llama_config"].items() if k != "model_type"}
    esm = {k: v for k, v in c["esm_config"].items() if k != "model_type"}
    return LlamaConfig(**llama), EsmConfig(**esm), c["adapter_config"], int(c["placeholder_id"])


def expected_names(c: dict) -> Dict[str, tuple]:
    """A few tensors every such checkpoint holds, with their shapes: the layout check reads only the index."""
    e, a, l = c["esm_config"], c["adapter_config"], c["llama_config"]
    names = {f"{ESM}embeddings.word_embeddings.weight": (e["vocab_size"], e["hidden_size"]),
             f"{ESM}encoder.layer.{e['num_hidden_layers'] - 1}.attention.self.query.weight":
                 (e["hidden_size"], e["hidden_size"]),
             f"{ADAPTER}fc1.weight": (a["intermediate_dim"], a["input_dim"]), f"{ADAPTER}fc1.bias":
                 (a["intermediate_dim"],),
             f"{ADAPTER}fc2.weight": (a["output_dim"], a["intermediate_dim"]), f"{ADAPTER}fc2.bias": (a["output_dim"],),
             f"{LLAMA}model.embed_tokens.weight": (l["vocab_size"], l["hidden_size"]),
             f"{LLAMA}model.layers.{l['num_hidden_layers'] - 1}.mlp.down_proj.weight":
                 (l["hidden_size"], l["intermediate_size"])}
    if not l.get("tie_word_embeddings"):
        names[f"{LLAMA}lm_head.weight"] = (l["vocab_size"], l["hidden_size"])
    return names


def check(path: str) -> HFDir:
    """The directory opened lazily, after its config and weight names were checked against the layout."""
    c = read_config(path)
    ck = HFDir(path)
    for name in sorted(ck.keys()):
        if not name.startswith((ESM, ADAPTER, LLAMA)):
            raise CheckpointError(f"{path}: weight {name!r} is outside the Prot2Text-V2 layout; expected names "
                                  f"under {ESM!r}, {ADAPTER!r} or {LLAMA!r}")
    for name, shape in expected_names(c).items():
        if not ck.has(name):
            raise CheckpointError(f"{path}: weight {name!r} is missing (expected shape {list(shape)}); found e.g. "
                                  f"{sorted(ck.keys())[:3]}")
        if tuple(ck.shape(name)) != shape:
            raise CheckpointError(f"{path}: weight {name!r} is {list(ck.shape(name))}, expected {list(shape)} "
                                  f"from config.json")
    return ck


def save_imported(model, cfg, source: str, out: str) -> None:
    """Collective: the model as a megatron checkpoint in `out`, beside the source's config.json, the tensors our
    model does not use (so an export gives the source back bit for bit) and its tokenizer when it has one."""
    from megatron_p2t.checkpoint import sharded  # megatron-core: see write()
    from megatron_p2t.checkpoint.run_dir import RunDir
    sharded.save(model, out)
    if torch.distributed.get_rank() == 0:
        shutil.copy(os.path.join(source, "config.json"), os.path.join(out, "config.json"))
        save_file({n: t.contiguous() for n, t in carried(source).items()}, os.path.join(out, EXTRA_FILE),
                  metadata={"format": "pt", "p2tv2_source": json.dumps(source_layout(source))})
        if os.path.exists(os.path.join(source, "tokenizer_config.json")):
            for f in TOKENIZER_FILES:
                if os.path.exists(os.path.join(source, f)):
                    shutil.copy(os.path.join(source, f), os.path.join(out, f))
            if not cfg.data.text_tokenizer:  # the import's own tokenizer, recorded for the commands after it
                data = dataclasses.replace(cfg.data, text_tokenizer=os.path.abspath(out))
                cfg = dataclasses.replace(cfg, data=data)
    RunDir(out).write_info(cfg, "import")
    torch.distributed.barrier()


def unused(name: str) -> bool:
    return name.startswith(UNUSED) or name.endswith(ROTARY)


def carried(path: str) -> Dict[str, object]:
    """The unused tensors of a Prot2Text-V2 directory, or of an import of one (kept beside its checkpoint)."""
    if os.path.exists(os.path.join(path, EXTRA_FILE)):
        return load_file(os.path.join(path, EXTRA_FILE))
    ck = HFDir(path)
    return {n: ck.get(n) for n in ck.keys() if unused(n)}


def source_layout(path: str) -> dict:
    """How a Prot2Text-V2 directory (or an import of one, which recorded it) stores its tensors: names spelled
    otherwise than weight/bias ({name: stored name}) and each tensor's dtype, so an export writes them back as
    they were, whatever dtype the model ran in."""
    extra = os.path.join(path, EXTRA_FILE)
    if os.path.exists(extra):
        with safe_open(extra, "pt") as f:
            meta = (f.metadata() or {}).get("p2tv2_source")
        if meta:
            return json.loads(meta)
        return {"renamed": {}, "dtypes": {}}   # an import made before the layout was recorded
    ck = HFDir(path)
    return {"renamed": ck.renamed(), "dtypes": {n: ck.dtype(n) for n in ck.keys()}}


def as_source(slices, layout: dict | None):
    """Slices with the source's names and dtypes (see source_layout)."""
    if not layout:
        return slices
    names, dtypes = layout.get("renamed", {}), layout.get("dtypes", {})
    out = []
    for s in slices:
        s = s._replace(name=names.get(s.name, s.name))
        want = _DTYPES.get(dtypes.get(s.name) or dtypes.get(canonical(s.name), ""))
        out.append(s._replace(tensor=s.tensor.to(want)) if want is not None else s)
    return out


def esm_extras(esm_dir: str, esm_cfg) -> Dict[str, object]:
    """What the authors' EsmModel holds beside the weights our encoder uses, for an export that does not come
    from an import: the contact head from the ESM checkpoint the run started from, and the rotary inverse
    frequencies (as stored there, else computed), so their class loads the export with nothing missing."""
    from megatron_p2t.checkpoint.esm_hf import detect_prefix, rotary_inv_freq
    ck = HFDir(esm_dir)
    p = detect_prefix(ck)
    out = {ESM + n[len(p):]: ck.get(n) for n in ck.keys()
           if n.startswith(p) and (n[len(p):].startswith("contact_head.") or n.endswith(ROTARY))}
    if not any(n.endswith(ROTARY) for n in out):
        out[ESM + ROTARY] = rotary_inv_freq(esm_cfg)
    return out


def composite_config(llama_cfg, esm_cfg, pcfg, placeholder: int) -> dict:
    esm = esm_cfg.to_dict()
    esm["architectures"] = ["EsmModel"]
    llama = llama_cfg.to_dict()
    llama["architectures"] = ["LlamaForCausalLM"]
    return {"model_type": MODEL_TYPE, "architectures": ["Esm2LlamaInstructForCausalLM"], "esm_config": esm,
            "adapter_config": {"model_type": "modality_adapter", "input_dim": pcfg.input_dim,
                               "intermediate_dim": pcfg.intermediate_dim, "output_dim": pcfg.output_dim,
                               "dropout_rate": pcfg.dropout},
            "llama_config": llama, "placeholder_id": placeholder}


def write(model, out: str, llama_cfg, esm_cfg, pcfg, placeholder: int, tp_rank: int, tp: int,
          extra: Dict[str, object], tokenizer_dir: str = "", source_config: str = "",
          source: dict | None = None) -> None:
    """Collective over every rank of any TP x PP layout: the model (LoRA merged beforehand) in the published
    layout. `extra`: tensors to carry (the adapter's unused LayerNorms ...); identity LayerNorms when absent, so
    the authors' class loads without missing keys. `source_config`: a config.json to keep verbatim (the shapes
    are the source's), else one is composed from the model's configs. `source`: the source's names and dtypes
    (source_layout) to write the tensors back with."""
    # deferred: these adapters import megatron-core, and hf_model reads this layout with transformers alone
    from megatron_p2t.checkpoint import esm_hf, export_hf, llama_hf, projector_hf
    from megatron_p2t.checkpoint.slicing import Slice
    slices = llama_hf.hf_slices(model.llm, llama_cfg, tp_rank, tp, prefix=LLAMA)
    if model.pre_process:
        slices += esm_hf.hf_slices(model.esm, tp_rank, tp, prefix=ESM)
        slices += projector_hf.hf_slices(model.connector, pcfg, tp_rank, tp, prefix=ADAPTER)
        if tp_rank == 0:
            ln = {f"{ADAPTER}ln1.weight": torch.ones(pcfg.intermediate_dim),
                  f"{ADAPTER}ln1.bias": torch.zeros(pcfg.intermediate_dim),
                  f"{ADAPTER}ln2.weight": torch.ones(pcfg.output_dim), f"{ADAPTER}ln2.bias": torch.zeros(pcfg.output_dim)}
            ln.update(extra)
            written = {n for n, *_ in slices}
            slices += [Slice(n, None, 0, 0, t) for n, t in ln.items() if n not in written]
    export_hf.export({out: as_source(slices, source)}, out)
    if torch.distributed.get_rank() == 0:
        if source_config:
            shutil.copy(source_config, os.path.join(out, "config.json"))
        else:
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(composite_config(llama_cfg, esm_cfg, pcfg, placeholder), f, indent=2, sort_keys=True)
        if tokenizer_dir:
            load_text_tokenizer(tokenizer_dir).save_pretrained(out)
    torch.distributed.barrier()
