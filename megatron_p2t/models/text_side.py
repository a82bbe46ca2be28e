"""Stage 1's text side: the frozen LLaMA's first k decoder layers (only those are built), hidden states of
layer k mean- and std-pooled over the text tokens. Prot2Text-V2 reads layer 16 of 32.

It runs tensor-parallel like the decoder; its config carries pipeline size 1 because stage 1 places the whole
(truncated, frozen) text tower beside the protein tower rather than pipelining it -- and with the text cache
it does not run during training at all.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_p2t.models import llama as llama_mod
from megatron_p2t.models.pooling import masked_mean_std
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.transformer.attention import repad, unpad


class TextPooler(MegatronModule):
    def __init__(self, hf_cfg, layer: int = 16, params_dtype=torch.float32, layout: Layout | None = None,
                 attention_kernel: str = "auto"):
        if not 1 <= layer < hf_cfg.num_hidden_layers:
            raise ValueError(f"text layer {layer}: pick an intermediate layer, 1..{hf_cfg.num_hidden_layers - 1} "
                             f"(HF's last hidden state has passed the final norm; H-SCALE reads a middle layer)")
        cfg = llama_mod.transformer_config(hf_cfg, num_layers=layer, params_dtype=params_dtype, layout=layout,
                                           pipeline_model_parallel_size=1)
        super().__init__(cfg)
        self.llm = llama_mod.build(hf_cfg, pre_process=True, post_process=False, config=cfg,
                                   attention_kernel=attention_kernel)
        for p in self.parameters():
            p.requires_grad_(False)
        self.unpad = True     # False: the padded batch as it is, causal over the row (tests and bench compare them)

    @torch.no_grad()
    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor):
        """text_ids/mask [b, s] (function text + <|eot_id|>, no chat template) -> (mean [b, h], std [b, h]).
        A batch with padding runs its real tokens only, the texts back to back in one row with segment ids, causal
        within each (the decoder's packed rows: model.attention_kernel's kernel); rotary scores depend only on the
        distance between two tokens of a text, so each text sees what it sees alone."""
        b, s = text_ids.shape
        mask = text_mask.bool()
        if not self.unpad or bool(mask.all()):
            pos = torch.arange(s, device=text_ids.device)[None].expand_as(text_ids)
            hidden = self.llm(input_ids=text_ids, position_ids=pos, attention_mask=None)   # [s, b, h], causal
            return masked_mean_std(hidden.transpose(0, 1).float(), text_mask)
        u = unpad(mask)
        hidden = self.llm(input_ids=text_ids.flatten()[u.keep].unsqueeze(0), position_ids=u.pos.unsqueeze(0),
                          attention_mask=u.seg)                                                  # [T, 1, h]
        return masked_mean_std(repad(hidden[:, 0], u, b, s).float(), text_mask)
