"""The joined model's HF adapter: its state dict per rank from the three parts' HF layouts (ESM, projector,
LLaMA), and the way back to three HF directories. Each part's own adapter holds its name table."""
from __future__ import annotations

import json
import os

import torch

from megatron_p2t.checkpoint import esm_hf, esm_structure_hf, export_hf
from megatron_p2t.models.p2t import Prot2TextModel


def decoder_tensors(model: Prot2TextModel, llama_src, llama_hf_cfg, tp_rank: int, tp: int, prefix: str = "",
                    moe=None):
    """The decoder's tensors through its part's adapter: LLaMA's, or (moe: a mixture of experts) read or upcycled."""
    return model.decoder_spec.tensors(model.llm, llama_src, llama_hf_cfg, moe, tp_rank, tp, prefix)


def megatron_tensors(model: Prot2TextModel, esm_src, llama_src, projector_src, llama_hf_cfg, projector_cfg,
                     tp_rank: int, tp: int, esm_prefix=None, llama_prefix: str = "", projector_prefix: str = "",
                     moe=None):
    """This rank's expected state dict of the joined model, from HF-layout sources (directories or tensors).
    projector_src: the connector's, in its part's HF names (projector_cfg: kept for callers; the built connector
    knows its shapes)."""
    sd = {f"llm.{k}": v for k, v in
          decoder_tensors(model, llama_src, llama_hf_cfg, tp_rank, tp, llama_prefix, moe).items()}
    if model.pre_process and model.reads_protein:
        sd.update({f"esm.{k}": v for k, v in esm_hf.megatron_tensors(model.esm, esm_src, tp_rank, tp,
                                                                      esm_prefix).items()})
        if projector_src is None:      # the connector keeps its fresh initialisation
            return sd
        sd.update({f"connector.{k}": v for k, v in model.connector_spec.adapter.tensors(
            projector_src, model.connector, tp_rank, tp, projector_prefix).items()})
    return sd


def hf_export(model: Prot2TextModel, out_dir: str, llama_hf_cfg, esm_hf_cfg, projector_cfg, tp_rank: int,
              tp: int, resampler_cfg=None, moe=None, ep_rank: int = 0, esm_src: str | None = None) -> None:
    """Collective: write out_dir/{llama,esm,<the connector's directory>} in HF layout from any TP x PP (x EP)
    layout; the connector's part names its directory and layout (Prot2Text-V2's projector/, the released
    Protein2Text / LLaVA names under connector/, which hf/connector.py reads). A decoder-only model writes llama/
    alone. An MoE decoder (moe) goes to llama/ in Qwen2-MoE's layout (llama_moe_hf); expert-parallel ranks other
    than the first give their experts only. esm_src: the ESM checkpoint the model started from, whose contact head
    esm/ carries (esm_hf.model_extras). projector_cfg, resampler_cfg: kept for callers; the connector knows its
    settings."""
    adapter = model.connector_spec.adapter
    dirs = {"llama": os.path.join(out_dir, "llama"), "esm": os.path.join(out_dir, "esm")}
    if adapter is not None:
        dirs["connector"] = os.path.join(out_dir, adapter.directory)
    slices = {dirs["llama"]: model.decoder_spec.slices(model.llm, llama_hf_cfg, moe, tp_rank, tp, ep_rank)}
    llama_hf_cfg = model.decoder_spec.hf_config(llama_hf_cfg, moe)
    if ep_rank:                         # the first expert-parallel rank writes everything but other experts
        export_hf.export(slices, out_dir)
        return
    if not model.reads_protein:
        export_hf.export(slices, out_dir, hf_configs={dirs["llama"]: llama_hf_cfg}
                         if torch.distributed.get_rank() == 0 else None)
        return
    if model.pre_process:
        slices[dirs["esm"]] = esm_hf.hf_slices(model.esm, tp_rank, tp)
        if tp_rank == 0:
            slices[dirs["esm"]] += esm_hf.model_extras(esm_src, esm_hf_cfg, model.esm.config.num_layers)
        slices[dirs["connector"]] = adapter.slices(model.connector, tp_rank, tp)
        if hasattr(model.esm, "structure"):       # the structure-aware encoder's distance bias: beside esm/
            slices[os.path.join(out_dir, "structure")] = esm_structure_hf.hf_slices(
                model.esm.structure, esm_hf_cfg.num_attention_heads, tp_rank, tp)
    configs = None
    if torch.distributed.get_rank() == 0:
        esm_cfg = esm_hf_cfg.__class__.from_dict(esm_hf_cfg.to_dict())
        esm_cfg.architectures = ["EsmModel"]
        if not model.esm.final_norm:   # an inner layer's states (Protein2Text: -2): the layers read, no final norm
            esm_cfg.num_hidden_layers = model.esm.config.num_layers
        configs = {dirs["llama"]: llama_hf_cfg, dirs["esm"]: esm_cfg}
    export_hf.export(slices, out_dir, hf_configs=configs)
    if torch.distributed.get_rank() != 0:
        return
    if hasattr(getattr(model, "esm", None), "structure"):
        with open(os.path.join(out_dir, "structure", "config.json"), "w") as f:
            json.dump(esm_structure_hf.config(model.esm.structure.cfg, esm_hf_cfg.num_attention_heads), f, indent=1)
    with open(os.path.join(dirs["connector"], "config.json"), "w") as f:
        json.dump(adapter.config(model.connector, esm_hf_cfg.hidden_size, llama_hf_cfg.hidden_size), f, indent=1)
