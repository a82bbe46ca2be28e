"""The model named by a run config, built for this rank's pipeline stage, with weights from HF directories
or from a megatron checkpoint."""
from __future__ import annotations

import json
import os

import torch

from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir


def _hf_config(path: str, kind: str):
    from transformers import AutoConfig
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json -- model.{kind} must name a local HF checkpoint directory "
                              f"(download it once, e.g. with `huggingface-cli download`, and pass its path)")
    return AutoConfig.from_pretrained(path)


def placeholder_id(cfg) -> int:
    """The placeholder token's id, from the configured tokenizer (LLaMA-3.1: 128003), or the one a Prot2Text-V2
    directory names."""
    published = None
    if cfg.model.p2tv2:
        from megatron_p2t.checkpoint import p2tv2
        published = int(p2tv2.read_config(cfg.model.p2tv2)["placeholder_id"])
    if not cfg.data.text_tokenizer:
        return 128003 if published is None else published
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    tok = load_text_tokenizer(cfg.data.text_tokenizer)
    pid = tok.convert_tokens_to_ids(cfg.model.placeholder_token)
    if pid is None or pid == tok.unk_token_id:
        raise ValueError(f"{cfg.data.text_tokenizer}: no token {cfg.model.placeholder_token!r}")
    if published is not None and published != pid:
        raise CheckpointError(f"{cfg.model.p2tv2}: placeholder_id {published}, but {cfg.data.text_tokenizer} gives "
                              f"{cfg.model.placeholder_token!r} the id {pid}; use the checkpoint's own tokenizer")
    return pid


def dtype_of(cfg) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]


def hf_configs(cfg):
    """(llama HF config, esm HF config, projector config with its dims filled from them)."""
    pcfg = cfg.model.projector
    if cfg.model.p2tv2:  # the published layout decides every shape, the adapter's width included
        from megatron_p2t.checkpoint import p2tv2
        llama_cfg, esm_cfg, adapter, _ = p2tv2.hf_configs(cfg.model.p2tv2)
        pcfg.input_dim, pcfg.intermediate_dim = adapter["input_dim"], adapter["intermediate_dim"]
        pcfg.output_dim = adapter["output_dim"]
        return llama_cfg, esm_cfg, pcfg
    llama_cfg, esm_cfg = _hf_config(cfg.model.llama, "llama"), _hf_config(cfg.model.esm, "esm")
    pcfg.input_dim = pcfg.input_dim or esm_cfg.hidden_size
    pcfg.output_dim = pcfg.output_dim or llama_cfg.hidden_size
    return llama_cfg, esm_cfg, pcfg


def build(cfg):
    """(model for this rank, llama HF config, esm HF config, projector config)."""
    from megatron.core import parallel_state as ps

    from megatron_p2t.models import llama as llama_mod
    from megatron_p2t.models import p2t
    from megatron_p2t.models.esm import ESMConfig
    llama_cfg, esm_cfg, pcfg = hf_configs(cfg)
    model = p2t.Prot2TextModel(ESMConfig.from_hf(esm_cfg), llama_cfg, pcfg, placeholder_id(cfg),
                               pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                               esm_output_layer=cfg.model.esm_output_layer, freeze=cfg.model.freeze,
                               llm_config=llama_mod.transformer_config(llama_cfg, params_dtype=dtype_of(cfg)))
    if torch.cuda.is_available():  # plain torch parts (the ESM embedding) are built on the CPU, as in Megatron-LM
        model.cuda(torch.cuda.current_device())
    return model, llama_cfg, esm_cfg, pcfg


def load_hf(model, cfg, llama_cfg, pcfg) -> None:
    """ESM and LLaMA from their HF directories; the projector from model.projector_weights when given (a
    directory with fc1/fc2 tensors), else it keeps its fresh initialisation (stage 1 starts that way). All three
    from one Prot2Text-V2 directory when model.p2tv2 names one."""
    from megatron.core import parallel_state as ps

    from megatron_p2t.checkpoint.llama_hf import copy_into
    from megatron_p2t.models import p2t
    tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if cfg.model.p2tv2:
        from megatron_p2t.checkpoint import p2tv2
        ck = p2tv2.check(cfg.model.p2tv2)
        copy_into(model, p2t.megatron_tensors(model, ck, ck, ck, llama_cfg, pcfg, tpr, tp, esm_prefix=p2tv2.ESM,
                                              llama_prefix=p2tv2.LLAMA, projector_prefix=p2tv2.ADAPTER),
                  cfg.model.p2tv2)
        return
    proj = HFDir(cfg.model.projector_weights) if cfg.model.projector_weights else None
    copy_into(model, p2t.megatron_tensors(model, HFDir(cfg.model.esm), HFDir(cfg.model.llama), proj, llama_cfg,
                                          pcfg, tpr, tp), f"{cfg.model.esm} + {cfg.model.llama}",
              keep=() if proj else ("projector.",))


def write_run_info(directory: str, cfg) -> None:
    """What a checkpoint was made from, beside it, for the commands that read it later."""
    from megatron_p2t.config import to_dict
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(directory, "megatron_p2t.json"), "w") as f:
            json.dump({"config": to_dict(cfg)}, f, indent=1, default=str)
