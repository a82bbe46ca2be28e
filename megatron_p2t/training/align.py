"""Stage 1 model: ESM-2 (frozen) -> projector (trained) pooled to mean/std over the protein's tokens, against
the frozen LLaMA's layer-k states of the function text pooled the same way, scored by H-SCALE."""
from __future__ import annotations

import torch

from megatron_p2t.models.specs import megatron_module
from megatron_p2t.training.loss import (hscale_loss, learnable_temperature, masked_mean_std, retrieval_accuracy,
                                        temperature_of)


class AlignModel(megatron_module()):
    def __init__(self, esm_cfg, llama_hf_cfg, projector_cfg, align_cfg, esm_output_layer: int = -1,
                 params_dtype=torch.float32, text_side: bool = True):
        from megatron_p2t.models import llama as llama_mod
        from megatron_p2t.models.esm import ESMEncoder
        from megatron_p2t.models.projector import Projector
        from megatron_p2t.models.text_side import TextPooler
        config = llama_mod.transformer_config(llama_hf_cfg, params_dtype=params_dtype, pipeline_model_parallel_size=1)
        super().__init__(config)
        self.align_cfg = align_cfg
        self.esm = ESMEncoder(esm_cfg, output_layer=esm_output_layer, params_dtype=params_dtype)
        self.projector = Projector(projector_cfg, config)
        self.text = TextPooler(llama_hf_cfg, layer=align_cfg.text_layer, params_dtype=params_dtype) \
            if text_side else None
        for p in self.esm.parameters():
            p.requires_grad_(False)
        self.log_inv_temp = learnable_temperature(align_cfg.temperature) if align_cfg.learnable_temperature else None

    def protein_vectors(self, batch):
        h = self.projector(self.esm(batch["protein_ids"], batch["protein_mask"]))
        return masked_mean_std(h.float(), batch["protein_mask"])

    def text_vectors(self, batch):
        if "text_mean" in batch:  # from the text cache
            return batch["text_mean"].float(), batch["text_std"].float()
        if self.text is None:
            raise ValueError("no text side was built and the batch carries no cached text vectors; set "
                             "data.text_cache (megatron-p2t cache-text) or align.use_text_cache=false")
        return self.text(batch["text_ids"], batch["text_mask"])

    def forward(self, batch, dp_group=None):
        """(loss, metrics) for this rank's batch; negatives from the whole data-parallel group."""
        pm, ps = self.protein_vectors(batch)
        tm, ts = self.text_vectors(batch)
        group = dp_group if self.align_cfg.gather_negatives else _single_group()
        temp = temperature_of(self.log_inv_temp, self.align_cfg.temperature)
        loss = hscale_loss(pm, ps, tm, ts, temp, weights=tuple(self.align_cfg.weights), group=group,
                           symmetric=self.align_cfg.symmetric, variant=self.align_cfg.variant)
        acc = retrieval_accuracy(pm, ps, tm, ts, group, weights=tuple(self.align_cfg.weights),
                                 variant=self.align_cfg.variant)
        return loss, {"acc_top1": acc, "temperature": temp.detach()}


_SINGLE = {}


def _single_group():
    """A group holding only this rank: negatives from the local batch only (the released code's behaviour)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return None
    if "g" not in _SINGLE:
        groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
        _SINGLE["g"] = groups[dist.get_rank()]
    return _SINGLE["g"]
