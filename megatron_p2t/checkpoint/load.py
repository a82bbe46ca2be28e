"""The model a run config names: its parts' shapes read from the checkpoint directories it names (HF ESM and
LLaMA, or one Prot2Text-V2 directory), the model built for this rank (models/build.py), and the weights each
rank reads for its own slices."""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
from transformers import AutoConfig

from megatron_p2t.checkpoint import esm_hf, llama_hf, llama_moe_hf, p2t_hf, p2tv2
from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
from megatron_p2t.checkpoint.slicing import copy_into
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from megatron_p2t.models import build as model_build
from megatron_p2t.models.parts_config import PROJECTOR_DROPOUT, check_room
from megatron_p2t.models.text_side import TextPooler
from megatron_p2t.parallel.layout import Layout


def hf_config(path: str, kind: str):
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json -- model.{kind} must name a local HF checkpoint directory "
                              f"(download it once, e.g. with `huggingface-cli download`, and pass its path)")
    return AutoConfig.from_pretrained(path)


def hf_configs(cfg, say: bool = False):
    """(llama HF config, esm HF config, the projector config with its dims and dropout filled in): the run
    config's own projector section is left as it is. A published Prot2Text-V2 directory decides every shape,
    and its adapter's dropout unless model.projector.dropout is set (`say`: print which was taken)."""
    pcfg = cfg.model.projector
    if cfg.model.p2tv2:
        llama_cfg, esm_cfg, adapter, _ = p2tv2.hf_configs(cfg.model.p2tv2)
        dropout, where = pcfg.dropout, "model.projector.dropout"
        if dropout is None:
            dropout = float(adapter.get("dropout_rate", p2tv2.ADAPTER_DROPOUT))
            where = f"{os.path.join(cfg.model.p2tv2, 'config.json')} (adapter_config.dropout_rate)"
        if say:
            print(f"projector dropout {dropout} from {where}", file=sys.stderr, flush=True)
        return llama_cfg, esm_cfg, dataclasses.replace(pcfg, input_dim=adapter["input_dim"],
                                                       intermediate_dim=adapter["intermediate_dim"],
                                                       output_dim=adapter["output_dim"], dropout=dropout)
    llama_cfg = hf_config(cfg.model.llama, "llama")
    check_decoder(cfg, llama_cfg)
    if cfg.model.encoder == "none":        # decoder-only: no ESM, and the projector section is not used
        return llama_cfg, None, pcfg
    esm_cfg = hf_config(cfg.model.esm, "esm")
    return llama_cfg, esm_cfg, dataclasses.replace(
        pcfg, input_dim=pcfg.input_dim or esm_cfg.hidden_size, output_dim=pcfg.output_dim or llama_cfg.hidden_size,
        dropout=PROJECTOR_DROPOUT if pcfg.dropout is None else pcfg.dropout)


def check_decoder(cfg, llama_cfg) -> None:
    """model.llama against model.decoder: a mixture of experts (our export's Qwen2-MoE layout) is not a dense
    LLaMA, and an MoE decoder reads one with the configured experts or upcycles a dense one."""
    if llama_moe_hf.is_moe_dir(llama_cfg) and cfg.model.decoder != "llama_moe":
        raise CheckpointError(f"model.llama={cfg.model.llama} is a mixture of {llama_cfg.num_experts} experts "
                              f"({llama_cfg.model_type}), and model.decoder={cfg.model.decoder} is dense: set "
                              f"model.decoder=llama_moe (model.moe.experts={llama_cfg.num_experts}, top_k="
                              f"{llama_cfg.num_experts_per_tok}) to continue it")
    if cfg.model.decoder == "llama_moe":
        llama_moe_hf.check_source(llama_cfg, cfg.model.moe, cfg.model.llama)


def placeholder_id(cfg) -> int:
    """The placeholder token's id, from the configured tokenizer (LLaMA-3.1: 128003), or the one a Prot2Text-V2
    directory names; -1 for a decoder-only recipe, whose prompts hold no placeholder."""
    if cfg.model.encoder == "none":
        return -1
    published = int(p2tv2.read_config(cfg.model.p2tv2)["placeholder_id"]) if cfg.model.p2tv2 else None
    if not cfg.data.text_tokenizer:
        return 128003 if published is None else published
    tok = load_text_tokenizer(cfg.data.text_tokenizer)
    pid = tok.convert_tokens_to_ids(cfg.model.placeholder_token)
    if pid is None or pid == tok.unk_token_id:
        raise ValueError(f"{cfg.data.text_tokenizer}: no token {cfg.model.placeholder_token!r}")
    if published is not None and published != pid:
        raise CheckpointError(f"{cfg.model.p2tv2}: placeholder_id {published}, but {cfg.data.text_tokenizer} gives "
                              f"{cfg.model.placeholder_token!r} the id {pid}; use the checkpoint's own tokenizer")
    return pid


def build_model(cfg, layout: Layout):
    """(model for this rank, llama HF config, esm HF config, projector config), weights as initialised."""
    llama_cfg, esm_cfg, pcfg = hf_configs(cfg, say=layout.rank == 0)
    try:
        check_room(cfg.model.connector, cfg.model.resampler, cfg.data.max_protein_residues,
                   cfg.data.max_text_tokens, llama_cfg.max_position_embeddings, cfg.model.p2tv2 or cfg.model.llama)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = model_build.build(cfg.model, layout, llama_cfg, esm_cfg, pcfg, placeholder_id(cfg))
    return model, llama_cfg, esm_cfg, pcfg


# parts no HF checkpoint has: the structure-aware encoder's distance bias starts fresh on a plain ESM-2 (an
# instruct.init_from / --resume of a run that trained it restores it)
FRESH = ("esm.structure.",)


def load_hf(model, cfg, llama_cfg, pcfg, layout: Layout) -> None:
    """ESM and LLaMA from their HF directories; the connector from model.projector_weights when given (a
    directory with fc1/fc2 tensors for `mlp`, Protein2Text's model.mm_resampler.* / model.mm_projector.* for the
    others), else it keeps its fresh initialisation (stage 1 starts that way). All three
    from one Prot2Text-V2 directory when model.p2tv2 names one."""
    tpr, tp = layout.tp_rank, layout.tp
    if cfg.model.p2tv2:
        ck = p2tv2.check(cfg.model.p2tv2)
        copy_into(model, p2t_hf.megatron_tensors(model, ck, ck, ck, llama_cfg, pcfg, tpr, tp, esm_prefix=p2tv2.ESM,
                                                 llama_prefix=p2tv2.LLAMA, projector_prefix=p2tv2.ADAPTER,
                                                 moe=model_build.moe_of(cfg.model)),
                  cfg.model.p2tv2, keep=FRESH)
        return
    proj = HFDir(cfg.model.projector_weights) if cfg.model.projector_weights else None
    esm = HFDir(cfg.model.esm) if model.reads_protein else None
    copy_into(model, p2t_hf.megatron_tensors(model, esm, HFDir(cfg.model.llama), proj, llama_cfg,
                                             pcfg, tpr, tp, moe=model_build.moe_of(cfg.model)),
              f"{cfg.model.esm} + {cfg.model.llama}", keep=FRESH + (() if proj else ("projector.", "connector.")))


def load_esm(esm, cfg, layout: Layout) -> None:
    copy_into(esm, esm_hf.megatron_tensors(esm, HFDir(cfg.model.esm), layout.tp_rank, layout.tp), cfg.model.esm,
              keep=tuple(k[len("esm."):] for k in FRESH))


def load_lm_head(head, cfg) -> None:
    """ESM-2's masked-LM head from model.esm when it is an EsmForMaskedLM checkpoint (facebook/esm2_* are), else
    it stays fresh (said on stderr)."""
    ck = HFDir(cfg.model.esm)
    names = {"dense.weight": "lm_head.dense.weight", "dense.bias": "lm_head.dense.bias",
             "layer_norm.weight": "lm_head.layer_norm.weight", "layer_norm.bias": "lm_head.layer_norm.bias",
             "bias": "lm_head.bias"}
    if not all(ck.has(n) for n in names.values()):
        print(f"{cfg.model.esm}: no lm_head (an EsmModel, not EsmForMaskedLM): the masked-residue head starts fresh",
              file=sys.stderr, flush=True)
        return
    copy_into(head, {k: ck.get(n) for k, n in names.items()}, cfg.model.esm)


def load_text_side(text: TextPooler, cfg, llama_cfg, layout: Layout) -> None:
    copy_into(text.llm, llama_hf.megatron_tensors(text.llm, HFDir(cfg.model.llama), llama_cfg, layout.tp_rank,
                                                  layout.tp), cfg.model.llama)


def build_text_side(cfg, layout: Layout) -> TextPooler:
    """The frozen LLaMA truncated to align.text_layer, loaded, on this rank's device (for cache-text)."""
    llama_cfg = hf_config(cfg.model.llama, "llama")
    text = TextPooler(llama_cfg, layer=cfg.align.text_layer, params_dtype=model_build.dtype_of(cfg), layout=layout,
                      attention_kernel=cfg.model.attention_kernel)
    load_text_side(text, cfg, llama_cfg, layout)
    return text.cuda(torch.cuda.current_device()) if torch.cuda.is_available() else text
