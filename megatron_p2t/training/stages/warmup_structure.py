"""`megatron-p2t warmup-structure`: SEPIT's warm-up of the structure-aware encoder before stage 1.

Each step masks `warmup.mask_fraction` of the residues (ESM-2's 80/10/10) and adds Gaussian noise of
`model.structure.noise_std` angstrom to the known coordinates, drawn per sample from (seed, epoch, key): the
same on every tensor-parallel rank and again after a resume. The loss is the weighted sum of InfoNCE between
pooled encoder states and the frozen text encoder's pooled states (negatives gathered over data-parallel
ranks, gradients through the gather), the masked-residue cross-entropy, and the MSE of the predicted noise.
The encoder's ESM-2 weights stay frozen unless model.freeze.esm=false; the distance bias trains. Stage 1 then
starts from the run with model.structure_init=RUN.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from megatron_p2t import parts
from megatron_p2t.config import ConfigError
from megatron_p2t.data import esm_alphabet
from megatron_p2t.data.loader import ProteinTextLoader
from megatron_p2t.models.esm import ESMConfig
from megatron_p2t.models.esm_structure import StructureESMEncoder
from megatron_p2t.models.warmup import WarmupModel
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parts import assemble
from megatron_p2t.training.align import _single_group
from megatron_p2t.training.batches import to_device, training_data
from megatron_p2t.training.driver import Stage
from megatron_p2t.training.loss import info_nce


SPECIAL = (esm_alphabet.CLS, esm_alphabet.PAD, esm_alphabet.EOS, esm_alphabet.UNK, esm_alphabet.MASK)


def check(cfg) -> None:
    if not parts.encoder(cfg.model.encoder).structure:
        which = " or ".join(n for n, e in parts.ENCODERS.items() if e.structure)
        raise ConfigError(f"warmup-structure trains the structure-aware encoder: set model.encoder={which} "
                          f"(not {cfg.model.encoder})")
    if not cfg.warmup.text_encoder:
        raise ConfigError("warmup.text_encoder: name a BERT-family HF directory (AutoModel + AutoTokenizer), the "
                         "frozen text side of the contrastive loss")
    if len(cfg.warmup.weights) != 3 or min(cfg.warmup.weights) < 0:
        raise ConfigError(f"warmup.weights={cfg.warmup.weights}: three non-negative weights (contrastive, masked "
                         f"residues, denoising)")
    if not 0.0 < cfg.warmup.mask_fraction < 1.0:
        raise ConfigError(f"warmup.mask_fraction={cfg.warmup.mask_fraction}: a fraction in (0, 1)")
    if cfg.parallel.pipeline != 1:
        raise ConfigError("warmup-structure runs tensor x data parallel (parallel.pipeline=1): the encoder lives on "
                         "one stage")
    if cfg.data.batch_size is None:
        raise ConfigError("warmup-structure needs fixed per-rank batches (data.batch_size): negatives are gathered "
                         "across data-parallel ranks")


def text_data(cfg):
    """The loader reads the text with the text encoder's tokenizer, ended by its [SEP] (or eos)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.warmup.text_encoder)
    end = tok.sep_token or tok.eos_token
    if end is None:
        raise ConfigError(f"{cfg.warmup.text_encoder}: the tokenizer has neither a [SEP] nor an eos token to end "
                          f"the text with; warmup.text_encoder names a BERT-family directory, whose tokenizer has one")
    return dataclasses.replace(cfg.data, text_tokenizer=cfg.warmup.text_encoder, text_end=end), tok


def build(cfg, layout: Layout) -> WarmupModel:
    from transformers import AutoModel
    _, esm_cfg, _ = assemble.hf_configs(cfg.model)
    torch.manual_seed(cfg.train.seed)
    enc = StructureESMEncoder(ESMConfig.from_hf(esm_cfg), cfg.model.structure, output_layer=-1,
                              params_dtype=assemble.dtype_of(cfg.model), layout=layout,
                              recompute=cfg.model.recompute.encoder,
                              attention_kernel=cfg.model.attention_kernel)
    assemble.load_esm(enc, cfg.model, layout)
    text = AutoModel.from_pretrained(cfg.warmup.text_encoder, dtype=assemble.dtype_of(cfg.model)).eval()
    for p in text.parameters():
        p.requires_grad_(False)
    model = WarmupModel(enc, text, text.config.hidden_size, cfg.warmup.dim, assemble.dtype_of(cfg.model))
    assemble.load_lm_head(model.lm_head, cfg.model)
    for p in enc.parameters():
        p.requires_grad_(not cfg.model.freeze.esm)
    for p in enc.structure.parameters():
        p.requires_grad_(not cfg.model.freeze.structure)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
        text.cuda(torch.cuda.current_device())
    return model


def corrupt(batch: dict, cfg, start_id) -> dict:
    """Masked residues, noised coordinates and the text encoder's input, drawn per sample from
    (seed, epoch, key): the targets `mlm_labels` (-100 where not masked) and `noise` (unit Gaussian)."""
    ids, known = batch["protein_ids"].clone(), batch["coords_mask"]
    labels = torch.full_like(ids, -100)
    noise = torch.zeros(batch["protein_coords"].shape)
    frac = cfg.warmup.mask_fraction
    for i, (key, epoch) in enumerate(zip(batch["keys"], batch["epochs"])):
        rng = np.random.default_rng([cfg.data.seed, int(epoch), zlib.crc32(key.encode()), 0x3A5])
        residues = np.flatnonzero(np.isin(ids[i].numpy(), SPECIAL, invert=True))
        n = max(1, int(round(frac * len(residues))))
        pick = rng.choice(residues, size=min(n, len(residues)), replace=False)
        labels[i, pick] = ids[i, pick]
        r = rng.random(len(pick))
        ids[i, pick[r < 0.8]] = esm_alphabet.MASK
        rand = pick[(r >= 0.8) & (r < 0.9)]
        ids[i, rand] = torch.from_numpy(rng.integers(4, 24, len(rand)))   # the 20 standard residues
        noise[i] = torch.from_numpy(rng.standard_normal(noise[i].shape).astype(np.float32))
    noise = noise * known.unsqueeze(-1)
    text, tmask = batch["text_ids"], batch["text_mask"]
    if start_id is not None:     # [CLS] first, as the text encoder was trained
        text = torch.cat([torch.full((text.shape[0], 1), start_id, dtype=text.dtype), text], 1)
        tmask = torch.cat([torch.ones(tmask.shape[0], 1, dtype=tmask.dtype), tmask], 1)
    return {**batch, "masked_ids": ids, "mlm_labels": labels, "noise": noise,
            "noisy_coords": batch["protein_coords"] + cfg.model.structure.noise_std * noise,
            "text_in": text, "text_in_mask": tmask}


def warmup_loss(engine, batch, cfg, dp_group=None):
    prot, text, logits, pred = engine(batch)
    group = dp_group if cfg.warmup.gather_negatives else _single_group()
    contrastive = info_nce(prot.float(), text.float(), cfg.warmup.temperature, group, symmetric=True)
    mlm = F.cross_entropy(logits.float().flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100)
    known = (batch["coords_mask"].bool() & batch["protein_mask"].bool()).unsqueeze(-1).float()
    if float(known.sum()) > 0:
        denoise = ((pred.float() - batch["noise"]) ** 2 * known).sum() / (3 * known.sum())
    else:   # a batch without structures: a zero that keeps the graph (every rank runs the same backward)
        denoise = pred.float().sum() * 0.0
    w = cfg.warmup.weights
    loss = w[0] * contrastive + w[1] * mlm + w[2] * denoise
    return loss, {"contrastive": contrastive.detach(), "mlm": mlm.detach(), "denoise": denoise.detach()}


class WarmupStructure(Stage):
    name = "warmup-structure"

    def prepare(self, cfg):
        check(cfg)
        data, tok = text_data(cfg)
        self.start_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        return dataclasses.replace(cfg, data=data, parallel=cfg.parallel.without_experts())

    def build(self, cfg, layout: Layout):
        return build(cfg, layout)

    def loader(self, cfg, layout: Layout):
        return ProteinTextLoader(training_data(cfg, cfg.data), layout.dp_rank, layout.dp)

    def step(self, cfg, layout: Layout):
        start_id = self.start_id
        return lambda engine, batch: warmup_loss(engine, to_device(corrupt(batch, cfg, start_id)), cfg,
                                                 layout.dp_group)
