"""The model a run config names, assembled from its parts (the registry): their shapes read from the checkpoint
directories the config names (HF ESM and LLaMA, or one Prot2Text-V2 directory), the joined model built for this
rank's pipeline stage, and the weights each rank reads for its own slices, through each part's HF adapter."""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
from transformers import AutoConfig

from megatron_p2t import parts
from megatron_p2t.checkpoint import esm_hf, llama_hf, llama_moe_hf, p2t_hf, p2tv2
from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
from megatron_p2t.checkpoint.slicing import copy_into
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from megatron_p2t.models import llama as llama_mod
from megatron_p2t.models.esm import ESMConfig
from megatron_p2t.models.p2t import Prot2TextModel
from megatron_p2t.models.parts_config import PROJECTOR_DROPOUT
from megatron_p2t.models.text_side import TextPooler
from megatron_p2t.parallel.layout import Layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_of(model_cfg) -> torch.dtype:
    return DTYPES[model_cfg.dtype]


def moe_of(model_cfg):
    """The MoE settings when the decoder is a mixture of experts, else None."""
    return parts.decoder(model_cfg.decoder).moe(model_cfg)


def fusions(on: bool) -> dict:
    """megatron-core's torch.compile'd kernels a decoder without TE or apex can use (model.fused_kernels); RoPE's
    fusion needs Transformer Engine, the gradient-accumulation one apex's CUDA extension, and the masked-softmax
    one is not on our attention's path."""
    return {"bias_activation_fusion": on, "bias_dropout_fusion": on}


def build(model_cfg, layout: Layout, llama_cfg, esm_cfg, pcfg, placeholder_id: int) -> Prot2TextModel:
    """Prot2TextModel for this rank: the encoder and connector (if the recipe has them) on the first stage, this
    stage's decoder layers. esm_cfg is None for a decoder-only recipe."""
    esm = ESMConfig.from_hf(esm_cfg) if esm_cfg is not None else None
    model = Prot2TextModel(model_cfg, parts.of(model_cfg), esm, llama_cfg, pcfg, placeholder_id,
                           pre_process=layout.first_stage, post_process=layout.last_stage,
                           llm_config=llama_mod.transformer_config(llama_cfg, params_dtype=DTYPES[model_cfg.dtype],
                                                                   layout=layout, moe=moe_of(model_cfg),
                                                                   recompute=model_cfg.recompute,
                                                                   **fusions(model_cfg.fused_kernels)),
                           layout=layout)
    if torch.cuda.is_available():  # plain torch parts (the ESM embedding) are built on the CPU, as in Megatron-LM
        model.cuda(torch.cuda.current_device())
    return model


def hf_config(path: str, kind: str):
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json -- model.{kind} must name a local HF checkpoint directory "
                              f"(download it once, e.g. with `huggingface-cli download`, and pass its path)")
    return AutoConfig.from_pretrained(path)


def hf_configs(model_cfg, say: bool = False):
    """(llama HF config, esm HF config, the projector config with its dims and dropout filled in): the run
    config's own projector section is left as it is. A published Prot2Text-V2 directory decides every shape,
    and its adapter's dropout unless model.projector.dropout is set (`say`: print which was taken)."""
    pcfg = model_cfg.projector
    if model_cfg.p2tv2:
        llama_cfg, esm_cfg, adapter, _ = p2tv2.hf_configs(model_cfg.p2tv2)
        dropout, where = pcfg.dropout, "model.projector.dropout"
        if dropout is None:
            dropout = float(adapter.get("dropout_rate", p2tv2.ADAPTER_DROPOUT))
            where = f"{os.path.join(model_cfg.p2tv2, 'config.json')} (adapter_config.dropout_rate)"
        if say:
            print(f"projector dropout {dropout} from {where}", file=sys.stderr, flush=True)
        return llama_cfg, esm_cfg, dataclasses.replace(pcfg, input_dim=adapter["input_dim"],
                                                       intermediate_dim=adapter["intermediate_dim"],
                                                       output_dim=adapter["output_dim"], dropout=dropout)
    llama_cfg = hf_config(model_cfg.llama, "llama")
    check_decoder(model_cfg, llama_cfg)
    if not parts.encoder(model_cfg.encoder).reads_protein:   # decoder-only: no ESM, the projector section unused
        return llama_cfg, None, pcfg
    esm_cfg = hf_config(model_cfg.encoder_path, "encoder_path")
    return llama_cfg, esm_cfg, dataclasses.replace(
        pcfg, input_dim=pcfg.input_dim or esm_cfg.hidden_size, output_dim=pcfg.output_dim or llama_cfg.hidden_size,
        dropout=PROJECTOR_DROPOUT if pcfg.dropout is None else pcfg.dropout)


def check_decoder(model_cfg, llama_cfg) -> None:
    """model.llama against model.decoder: a mixture of experts (our export's Qwen2-MoE layout) is not a dense
    LLaMA, and an MoE decoder reads one with the configured experts or upcycles a dense one."""
    moe = moe_of(model_cfg)
    if llama_moe_hf.is_moe_dir(llama_cfg) and moe is None:
        raise CheckpointError(f"model.llama={model_cfg.llama} is a mixture of {llama_cfg.num_experts} experts "
                              f"({llama_cfg.model_type}), and model.decoder={model_cfg.decoder} is dense: set "
                              f"model.decoder=llama_moe (model.moe.experts={llama_cfg.num_experts}, top_k="
                              f"{llama_cfg.num_experts_per_tok}) to continue it")
    if moe is not None:
        llama_moe_hf.check_source(llama_cfg, moe, model_cfg.llama)


def placeholder_id(model_cfg, text_tokenizer) -> int:
    """The placeholder token's id, from the run's tokenizer (data.text_tokenizer; LLaMA-3.1: 128003), or the one a
    Prot2Text-V2 directory names; -1 for a decoder-only recipe, whose prompts hold no placeholder."""
    if not parts.encoder(model_cfg.encoder).reads_protein:
        return -1
    published = int(p2tv2.read_config(model_cfg.p2tv2)["placeholder_id"]) if model_cfg.p2tv2 else None
    if not text_tokenizer:
        return 128003 if published is None else published
    tok = load_text_tokenizer(text_tokenizer)
    pid = tok.convert_tokens_to_ids(model_cfg.placeholder_token)
    if pid is None or pid == tok.unk_token_id:
        raise ValueError(f"{text_tokenizer}: no token {model_cfg.placeholder_token!r}")
    if published is not None and published != pid:
        raise CheckpointError(f"{model_cfg.p2tv2}: placeholder_id {published}, but {text_tokenizer} gives "
                              f"{model_cfg.placeholder_token!r} the id {pid}; use the checkpoint's own tokenizer")
    return pid


def build_model(model_cfg, data_cfg, layout: Layout):
    """(model for this rank, llama HF config, esm HF config, projector config), weights as initialised; data_cfg:
    the run's data section, whose longest sample must fit the decoder and whose tokenizer holds the placeholder."""
    llama_cfg, esm_cfg, pcfg = hf_configs(model_cfg, say=layout.rank == 0)
    try:
        parts.check_room(model_cfg, data_cfg.max_protein_residues, data_cfg.max_text_tokens,
                         llama_cfg.max_position_embeddings, model_cfg.p2tv2 or model_cfg.llama)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = build(model_cfg, layout, llama_cfg, esm_cfg, pcfg, placeholder_id(model_cfg, data_cfg.text_tokenizer))
    return model, llama_cfg, esm_cfg, pcfg


# parts no HF checkpoint has: the structure-aware encoder's distance bias starts fresh on a plain ESM-2 (an
# instruct.init_from / --resume of a run that trained it restores it)
FRESH = ("esm.structure.",)


def load_hf(model, model_cfg, llama_cfg, pcfg, layout: Layout) -> None:
    """ESM and LLaMA from their HF directories; the connector from model.connector_weights when given (a
    directory with fc1/fc2 tensors for `mlp`, Protein2Text's model.mm_resampler.* / model.mm_projector.* for the
    others), else it keeps its fresh initialisation (stage 1 starts that way). All three
    from one Prot2Text-V2 directory when model.p2tv2 names one."""
    tpr, tp = layout.tp_rank, layout.tp
    if model_cfg.p2tv2:
        ck = p2tv2.check(model_cfg.p2tv2)
        copy_into(model, p2t_hf.megatron_tensors(model, ck, ck, ck, llama_cfg, pcfg, tpr, tp, esm_prefix=p2tv2.ESM,
                                                 llama_prefix=p2tv2.LLAMA, projector_prefix=p2tv2.ADAPTER,
                                                 moe=moe_of(model_cfg)),
                  model_cfg.p2tv2, keep=FRESH)
        return
    proj = HFDir(model_cfg.connector_weights) if model_cfg.connector_weights else None
    esm = HFDir(model_cfg.encoder_path) if model.reads_protein else None
    copy_into(model, p2t_hf.megatron_tensors(model, esm, HFDir(model_cfg.llama), proj, llama_cfg,
                                             pcfg, tpr, tp, moe=moe_of(model_cfg)),
              f"{model_cfg.encoder_path} + {model_cfg.llama}", keep=FRESH + (() if proj else ("connector.",)))


def load_esm(esm, model_cfg, layout: Layout) -> None:
    path = model_cfg.encoder_path
    copy_into(esm, esm_hf.megatron_tensors(esm, HFDir(path), layout.tp_rank, layout.tp), path,
              keep=tuple(k[len("esm."):] for k in FRESH))


def load_lm_head(head, model_cfg) -> None:
    """ESM-2's masked-LM head from model.encoder_path when it is an EsmForMaskedLM checkpoint (facebook/esm2_* are),
    else it stays fresh (said on stderr)."""
    ck = HFDir(model_cfg.encoder_path)
    names = {"dense.weight": "lm_head.dense.weight", "dense.bias": "lm_head.dense.bias",
             "layer_norm.weight": "lm_head.layer_norm.weight", "layer_norm.bias": "lm_head.layer_norm.bias",
             "bias": "lm_head.bias"}
    if not all(ck.has(n) for n in names.values()):
        print(f"{model_cfg.encoder_path}: no lm_head (an EsmModel, not EsmForMaskedLM): the masked-residue head starts "
              f"fresh", file=sys.stderr, flush=True)
        return
    copy_into(head, {k: ck.get(n) for k, n in names.items()}, model_cfg.encoder_path)


def load_text_side(text: TextPooler, model_cfg, llama_cfg, layout: Layout) -> None:
    copy_into(text.llm, llama_hf.megatron_tensors(text.llm, HFDir(model_cfg.llama), llama_cfg, layout.tp_rank,
                                                  layout.tp), model_cfg.llama)


def build_text_side(model_cfg, text_layer: int, layout: Layout) -> TextPooler:
    """The frozen LLaMA truncated to text_layer (align.text_layer), loaded, on this rank's device (for cache-text)."""
    llama_cfg = hf_config(model_cfg.llama, "llama")
    text = TextPooler(llama_cfg, layer=text_layer, params_dtype=dtype_of(model_cfg), layout=layout,
                      attention_kernel=model_cfg.attention_kernel)
    load_text_side(text, model_cfg, llama_cfg, layout)
    return text.cuda(torch.cuda.current_device()) if torch.cuda.is_available() else text
