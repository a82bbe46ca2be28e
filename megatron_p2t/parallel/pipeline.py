"""One training/eval step over microbatches with megatron-core's schedules (1F1B when pipeline size > 1)."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config


def masked_mean_loss(per_token: torch.Tensor, loss_mask: torch.Tensor):
    """GPTModel returns a loss per token [b, s]; average over the positions that count."""
    mask = loss_mask.float()
    loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"loss": loss.detach().clone()}


def run(model, microbatches: List[Dict[str, torch.Tensor]], forward_only: bool = False,
        loss_fn: Callable = masked_mean_loss, collect_outputs: bool = False) -> list:
    """Forward (+ backward) over `microbatches`; returns the per-microbatch loss dicts on the last stage
    (or, with collect_outputs, the model outputs, e.g. logits), and [] elsewhere. The backward of each
    microbatch is scaled by 1/len(microbatches), so the gradients are those of the mean loss. Microbatches may
    differ in shape (stage-2 batches and packed rows do): stages then exchange each activation's shape first."""

    first = microbatches[0]["input_ids"]
    config = get_model_config(model)
    config.variable_seq_lengths = len({tuple(b["input_ids"].shape) for b in microbatches}) > 1

    def step(data_iterator, m):
        b = next(data_iterator)
        kw = {"input_ids": b["input_ids"], "position_ids": b["position_ids"],
              "attention_mask": b.get("attention_mask"),  # packed rows: segment ids (transformer/attention.py)
              "padding_mask": b.get("padding_mask"),       # padded rows: True at the padding (MoE routing)
              "labels": None if collect_outputs else b["labels"]}
        if getattr(m, "reads_protein", False):  # the joined model also takes the protein
            kw.update(protein_ids=b["protein_ids"], protein_mask=b["protein_mask"],
                      protein_coords=b.get("protein_coords"), coords_mask=b.get("coords_mask"))
        out = m(**kw)
        if collect_outputs:
            return out, lambda o, non_loss_data=True: o.detach()
        return out, lambda o: loss_fn(o, b["loss_mask"])

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
        forward_only=forward_only or collect_outputs, collect_non_loss_data=collect_outputs)
