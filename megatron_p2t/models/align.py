"""Stage 1 model: ESM-2 (frozen) -> connector (Prot2Text-V2's projector, trained) pooled to mean/std over the
protein's tokens, beside the frozen LLaMA's layer-k states of the function text pooled the same way (or those
vectors from the text cache). Its forward gives the four pooled vectors; training/align.py scores them with H-SCALE."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_p2t.models import llama as llama_mod
from megatron_p2t.models.p2t import renamed_in_place, encode, make_encoder
from megatron_p2t.models.parts_config import ConnectorInputs
from megatron_p2t.models.pooling import masked_mean_std
from megatron_p2t.models.text_side import TextPooler
from megatron_p2t.parallel.layout import Layout


def learnable_temperature(init: float = 0.05) -> torch.nn.Parameter:
    """log(1/temperature) as a parameter (CLIP's parameterisation): temperature = exp(-p)."""
    return torch.nn.Parameter(torch.tensor(-float(torch.log(torch.tensor(init)))))


def temperature_of(p: Optional[torch.nn.Parameter], fixed: float) -> torch.Tensor:
    return torch.exp(-p) if p is not None else torch.tensor(fixed)


class AlignModel(MegatronModule):
    """specs: the (encoder, connector, decoder) specs model_cfg names; the connector is one H-SCALE pools."""

    def __init__(self, model_cfg, specs, esm_cfg, llama_hf_cfg, projector_cfg, align_cfg, params_dtype=torch.float32,
                 text_side: bool = True, layout: Layout | None = None, train_structure: bool = True):
        config = llama_mod.transformer_config(llama_hf_cfg, params_dtype=params_dtype, layout=layout,
                                              pipeline_model_parallel_size=1)
        super().__init__(config)
        self.align_cfg = align_cfg
        encoder_spec, self.connector_spec, _ = specs
        self.esm = make_encoder(encoder_spec, esm_cfg, model_cfg, params_dtype, layout)
        self.connector = self.connector_spec.build(ConnectorInputs(model_cfg, projector_cfg, esm_cfg.hidden_size,
                                                                   config.hidden_size, config))
        self.text = TextPooler(llama_hf_cfg, layer=align_cfg.text_layer, params_dtype=params_dtype,
                               layout=layout, attention_kernel=model_cfg.attention_kernel) if text_side else None
        for p in self.esm.parameters():
            p.requires_grad_(False)
        for p in getattr(self.esm, "structure", torch.nn.Module()).parameters():
            p.requires_grad_(train_structure)     # a fresh distance bias learns with the connector
        self.log_inv_temp = learnable_temperature(align_cfg.temperature) if align_cfg.learnable_temperature else None
        self.register_load_state_dict_pre_hook(renamed_in_place)   # stage-1 runs written as `projector`

    def protein_vectors(self, batch):
        states = encode(self.esm, batch["protein_ids"], batch["protein_mask"], batch.get("protein_coords"),
                        batch.get("coords_mask"))
        h, _ = self.connector_spec.run(self.connector, states, batch["protein_mask"])
        return masked_mean_std(h.float(), batch["protein_mask"])

    def text_vectors(self, batch):
        if "text_mean" in batch:  # from the text cache
            return batch["text_mean"].float(), batch["text_std"].float()
        if self.text is None:
            raise ValueError("no text side was built and the batch carries no cached text vectors; set "
                             "data.text_cache (megatron-p2t cache-text) or align.use_text_cache=false")
        return self.text(batch["text_ids"], batch["text_mask"])

    def temperature(self) -> torch.Tensor:
        return temperature_of(self.log_inv_temp, self.align_cfg.temperature)

    def forward(self, batch):
        """(protein mean, protein std, text mean, text std), each [b, h]."""
        return (*self.protein_vectors(batch), *self.text_vectors(batch))
