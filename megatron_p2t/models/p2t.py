"""The joined Prot2Text model: ESM-2 encoder -> projector -> LLaMA decoder.

The prompt carries one placeholder token per ESM token (<cls> and <eos> included); the projected protein
vectors replace the placeholders' embeddings before the first decoder layer. The encoder and projector live
on the first pipeline stage, next to the token embedding, as megatron-core's LLaVA places its vision tower;
the decoder layers spread over all stages.

Pipeline execution uses megatron-core's own schedules (1F1B via `get_forward_backward_func`) rather than
DeepSpeed's PipelineModule: GPTModel is already a pipeline stage (pre/post_process, set_input_tensor) and the
schedules share megatron's TP groups and tensor shapes; PipelineModule wants a flat list of layers and would
mean re-expressing GPTModel. DeepSpeed then provides the launcher and ZeRO over the data-parallel group.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_p2t.models import esm as esm_mod
from megatron_p2t.models import llama as llama_mod
from megatron_p2t.models.parts_config import FreezeConfig, ProjectorConfig
from megatron_p2t.models.projector import Projector
from megatron_p2t.models.specs import megatron_module


class Prot2TextModel(megatron_module()):
    def __init__(self, esm_cfg: esm_mod.ESMConfig, llama_hf_cfg, projector_cfg: ProjectorConfig,
                 placeholder_id: int, pre_process: bool = True, post_process: bool = True,
                 esm_output_layer: int = -1, freeze: FreezeConfig = FreezeConfig(), llm_config=None):
        llm_config = llm_config or llama_mod.transformer_config(llama_hf_cfg)
        super().__init__(llm_config)  # self.config: what megatron's schedules read, with model_type below
        self.pre_process, self.post_process, self.placeholder_id = pre_process, post_process, placeholder_id
        self.llm_config = llm_config
        self.llm = llama_mod.build(llama_hf_cfg, pre_process=pre_process, post_process=post_process,
                                   config=self.llm_config)
        self.model_type = self.llm.model_type
        if pre_process:
            self.esm = esm_mod.ESMEncoder(esm_cfg, output_layer=esm_output_layer,
                                          params_dtype=self.llm_config.params_dtype)
            self.projector = Projector(projector_cfg, self.llm_config)
        self.set_freeze(freeze)

    def set_freeze(self, freeze: FreezeConfig) -> None:
        for name, frozen in (("esm", freeze.esm), ("projector", freeze.projector), ("llm", freeze.llm)):
            part = getattr(self, name, None)
            if part is not None:
                for p in part.parameters():
                    p.requires_grad_(not frozen)

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def splice(self, input_ids, position_ids, protein_ids, protein_mask) -> torch.Tensor:
        """Token embeddings [s, b, h] with the placeholders replaced by projected protein vectors."""
        emb = self.llm.embedding(input_ids=input_ids, position_ids=position_ids)   # [s, b, h]
        slots = input_ids == self.placeholder_id                                    # [b, s]
        if protein_ids.shape[0] != input_ids.shape[0]:  # packed rows: proteins in placeholder order
            have, need = slots.sum(), protein_mask.sum()
            if have != need:
                raise ValueError(f"the packed batch has {int(have)} placeholder tokens but its proteins have "
                                 f"{int(need)} ESM tokens; proteins must be listed in the order their "
                                 f"placeholders appear (data/instruct.py's collate does this)")
            have = need = slots.new_zeros(1)
        else:
            have, need = slots.sum(1), protein_mask.sum(1)
        if not torch.equal(have, need):
            bad = int((have != need).nonzero()[0, 0])
            raise ValueError(f"sample {bad} of the batch has {int(have[bad])} placeholder tokens but its protein "
                             f"has {int(need[bad])} ESM tokens (residues + <cls> + <eos>); build the prompt with "
                             f"one placeholder per ESM token")
        prot = self.projector(self.esm(protein_ids, protein_mask))                 # [b, lp, h]
        flat = prot[protein_mask.bool()].to(emb.dtype)                              # [n, h], in row order
        emb_b = emb.transpose(0, 1)
        out = emb_b.masked_scatter(slots.unsqueeze(-1).expand_as(emb_b), flat)
        return out.transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids, attention_mask=None, protein_ids=None, protein_mask=None,
                labels: Optional[torch.Tensor] = None):
        decoder_input = None
        if self.pre_process:
            decoder_input = self.splice(input_ids, position_ids, protein_ids, protein_mask)
        return self.llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        decoder_input=decoder_input, labels=labels)


def megatron_tensors(model: Prot2TextModel, esm_src, llama_src, projector_src, llama_hf_cfg, projector_cfg,
                     tp_rank: int, tp: int, esm_prefix=None, llama_prefix: str = "", projector_prefix: str = ""):
    """This rank's expected state dict of the joined model, from HF-layout sources (directories or tensors)."""
    from megatron_p2t.checkpoint import esm_hf, llama_hf, projector_hf
    sd = {f"llm.{k}": v for k, v in
          llama_hf.megatron_tensors(model.llm, llama_src, llama_hf_cfg, tp_rank, tp, llama_prefix).items()}
    if model.pre_process:
        sd.update({f"esm.{k}": v for k, v in esm_hf.megatron_tensors(model.esm, esm_src, tp_rank, tp,
                                                                      esm_prefix).items()})
        if projector_src is not None:  # None: the projector keeps its fresh initialisation
            sd.update({f"projector.{k}": v for k, v in
                       projector_hf.tensors(projector_src, projector_cfg, tp_rank, tp, projector_prefix).items()})
    return sd


def hf_export(model: Prot2TextModel, out_dir: str, llama_hf_cfg, esm_hf_cfg, projector_cfg, tp_rank: int,
              tp: int) -> None:
    """Collective: write out_dir/{llama,esm,projector} in HF layout from any TP x PP layout."""
    import json
    import os

    from megatron_p2t.checkpoint import esm_hf, export_hf, llama_hf, projector_hf
    dirs = {k: os.path.join(out_dir, k) for k in ("llama", "esm", "projector")}
    slices = {dirs["llama"]: llama_hf.hf_slices(model.llm, llama_hf_cfg, tp_rank, tp)}
    if model.pre_process:
        slices[dirs["esm"]] = esm_hf.hf_slices(model.esm, tp_rank, tp)
        slices[dirs["projector"]] = projector_hf.hf_slices(model.projector, projector_cfg, tp_rank, tp)
    configs = None
    if torch.distributed.get_rank() == 0:
        esm_cfg = esm_hf_cfg.__class__.from_dict(esm_hf_cfg.to_dict())
        esm_cfg.architectures = ["EsmModel"]
        configs = {dirs["llama"]: llama_hf_cfg, dirs["esm"]: esm_cfg}
    export_hf.export(slices, out_dir, hf_configs=configs)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(dirs["projector"], "config.json"), "w") as f:
            json.dump({"model_type": "megatron_p2t_projector", **dataclasses.asdict(projector_cfg)}, f, indent=1)
