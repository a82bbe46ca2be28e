"""The joined model: ESM-2 encoder -> connector -> LLaMA decoder, or the decoder alone (`model.encoder=none`, a
decoder-only recipe such as ProLLaMA, which reads proteins as text).

The parts come as their specs (megatron_p2t.parts): the encoder's builds `esm`, the connector's builds
`connector` (whatever connector: Prot2Text-V2's projector, LLaVA's mlp2x_gelu and Protein2Text's resampler alike)
and turns the ESM states into decoder inputs (`run`), one vector per ESM token or a fixed number. The prompt
carries one placeholder token per vector (parts.slots); the vectors replace the placeholders' embeddings before
the first decoder layer. The encoder and connector live on the first pipeline stage, next to the token embedding,
as megatron-core's LLaVA places its vision tower; the decoder layers spread over all stages. The decoder is
`llm`, not `decoder`: megatron-core's 1F1B schedule takes a model's `decoder` for its TransformerBlock.

Pipeline execution uses megatron-core's own schedules (1F1B via `get_forward_backward_func`) rather than
DeepSpeed's PipelineModule: GPTModel is already a pipeline stage (pre/post_process, set_input_tensor) and the
schedules share megatron's TP groups and tensor shapes; PipelineModule wants a flat list of layers and would
mean re-expressing GPTModel. DeepSpeed then provides the launcher and ZeRO over the data-parallel group.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_p2t.models import esm as esm_mod
from megatron_p2t.models import llama as llama_mod
from megatron_p2t.models.parts_config import ConnectorInputs, FreezeConfig, ProjectorConfig
from megatron_p2t.parallel.layout import Layout


def make_encoder(spec, esm_cfg: esm_mod.ESMConfig, model_cfg, params_dtype, layout):
    """The protein encoder its spec builds (parts/encoders.py), reading model_cfg.esm_output_layer,
    model.recompute.encoder, and model.attention_kernel for the proteins of a batch run without padding."""
    return spec.build(esm_cfg, model_cfg, params_dtype=params_dtype, layout=layout,
                      recompute=model_cfg.recompute.encoder, attention_kernel=model_cfg.attention_kernel)


def encode(esm, ids, mask, coords=None, coords_mask=None):
    """ESM states; the structure-aware encoder also gets the coordinates (a batch built without them gives none)."""
    if coords is not None and hasattr(esm, "structure"):
        return esm(ids, mask, coords, coords_mask)
    return esm(ids, mask)


# the connector's attribute before every connector was `connector`: Prot2Text-V2's projector was `projector`
LEGACY_NAMES = (("projector.", "connector."),)


def current_name(name: str) -> str:
    """A tensor name of a checkpoint written before the rename, as the model names it now."""
    for old, new in LEGACY_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def legacy_name(name: str) -> str:
    """The inverse: the name a checkpoint written before the rename holds for this tensor of the model."""
    for old, new in LEGACY_NAMES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def renamed_in_place(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: a state dict written before the rename loads under today's names."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + current_name(k[len(prefix):])
        if new != k and new not in state_dict:
            state_dict[new] = state_dict.pop(k)


class Prot2TextModel(MegatronModule):
    """specs: the (encoder, connector, decoder) specs model_cfg names (megatron_p2t.parts.of); the model holds
    `esm` (the encoder), `connector` and `llm` (the decoder) whatever parts they are."""

    def __init__(self, model_cfg, specs, esm_cfg: esm_mod.ESMConfig, llama_hf_cfg, projector_cfg: ProjectorConfig,
                 placeholder_id: int, pre_process: bool = True, post_process: bool = True, llm_config=None,
                 layout: Layout | None = None):
        llm_config = llm_config or llama_mod.transformer_config(llama_hf_cfg, layout=layout)
        super().__init__(llm_config)  # self.config: what megatron's schedules read, with model_type below
        self.pre_process, self.post_process, self.placeholder_id = pre_process, post_process, placeholder_id
        self.llm_config = llm_config
        self.specs = self.encoder_spec, self.connector_spec, self.decoder_spec = specs
        self.llm = llama_mod.build(llama_hf_cfg, pre_process=pre_process, post_process=post_process,
                                   config=self.llm_config, attention_kernel=model_cfg.attention_kernel)
        self.model_type = self.llm.model_type
        self.reads_protein = self.encoder_spec.reads_protein      # decoder-only: the prompt is all text
        if pre_process and self.reads_protein:
            self.esm = make_encoder(self.encoder_spec, esm_cfg, model_cfg, self.llm_config.params_dtype, layout)
            self.connector = self.connector_spec.build(ConnectorInputs(model_cfg, projector_cfg, esm_cfg.hidden_size,
                                                                       self.llm_config.hidden_size, self.llm_config))
        self.set_freeze(model_cfg.freeze)
        self.register_load_state_dict_pre_hook(renamed_in_place)

    def set_freeze(self, freeze: FreezeConfig) -> None:
        for name, frozen in (("esm", freeze.esm), ("connector", freeze.connector), ("llm", freeze.llm)):
            part = getattr(self, name, None)
            if part is not None:
                for p in part.parameters():
                    p.requires_grad_(not frozen)
        structure = getattr(getattr(self, "esm", None), "structure", None)
        if structure is not None:
            for p in structure.parameters():
                p.requires_grad_(not freeze.structure)

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def protein_vectors(self, protein_ids, protein_mask, coords=None, coords_mask=None):
        """(vectors [b, n, h] for the prompt, mask [b, n]: the real ones) from the connector."""
        states = encode(self.esm, protein_ids, protein_mask, coords, coords_mask)
        return self.connector_spec.run(self.connector, states, protein_mask)

    def splice(self, input_ids, position_ids, protein_ids, protein_mask, coords=None, coords_mask=None) -> torch.Tensor:
        """Token embeddings [s, b, h] with the placeholders replaced by the connector's protein vectors."""
        emb = self.llm.embedding(input_ids=input_ids, position_ids=position_ids)   # [s, b, h]
        slots = input_ids == self.placeholder_id                                    # [b, s]
        prot, prot_mask = self.protein_vectors(protein_ids, protein_mask, coords, coords_mask)  # [b, n, h], [b, n]
        what = f"model.connector={self.connector_spec.name}: {self.connector_spec.summary}"
        if protein_ids.shape[0] != input_ids.shape[0]:  # packed rows: proteins in placeholder order
            have, need = slots.sum(), prot_mask.sum()
            if have != need:
                raise ValueError(f"the packed batch has {int(have)} placeholder tokens but its proteins fill "
                                 f"{int(need)} prompt slots ({what}); proteins must be listed in the order their "
                                 f"placeholders appear (data/instruct.py's collate does this)")
            have = need = slots.new_zeros(1)
        else:
            have, need = slots.sum(1), prot_mask.sum(1)
        if not torch.equal(have, need):
            bad = int((have != need).nonzero()[0, 0])
            raise ValueError(f"sample {bad} of the batch has {int(have[bad])} placeholder tokens but its protein "
                             f"fills {int(need[bad])} prompt slots ({what}); build the prompt with "
                             f"megatron_p2t.parts.slots placeholders")
        flat = prot[prot_mask].to(emb.dtype)                                        # [n, h], in row order
        emb_b = emb.transpose(0, 1)
        out = emb_b.masked_scatter(slots.unsqueeze(-1).expand_as(emb_b), flat)
        return out.transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids, attention_mask=None, protein_ids=None, protein_mask=None,
                labels: Optional[torch.Tensor] = None, protein_coords=None, coords_mask=None, padding_mask=None):
        decoder_input = None
        if self.pre_process and self.reads_protein:
            decoder_input = self.splice(input_ids, position_ids, protein_ids, protein_mask, protein_coords,
                                        coords_mask)
        if self.pre_process and self.training and torch.is_grad_enabled() and \
                self.llm_config.recompute_granularity == "full":
            # megatron-core recomputes through a reentrant autograd Function: a chunk whose input needs no gradient
            # (a frozen embedding, as in a decoder-only recipe) would give the adapters inside it none
            if decoder_input is None:
                decoder_input = self.llm.embedding(input_ids=input_ids, position_ids=position_ids)
            if not decoder_input.requires_grad and any(p.requires_grad for p in self.llm.decoder.parameters()):
                decoder_input = decoder_input.detach().requires_grad_()
        # [b, s] True at padding, which MoE routing leaves out (models/llama_moe.py); dense MLPs ignore it. Padded
        # batches hand it in; packed rows' is their segment 0
        if padding_mask is None and attention_mask is not None:
            padding_mask = attention_mask == 0
        return self.llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        decoder_input=decoder_input, labels=labels, padding_mask=padding_mask)
