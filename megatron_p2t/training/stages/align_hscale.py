"""Stage 1 with H-SCALE (`megatron-p2t align` for a connector H-SCALE pools, Prot2Text-V2's projector): ESM
frozen, the connector trained against the frozen LLaMA's pooled text states (or their cache), negatives gathered
over data-parallel ranks; evaluated by protein -> text retrieval on the validation split."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from megatron_p2t import parts
from megatron_p2t.checkpoint import esm_structure_hf
from megatron_p2t.checkpoint.hf_dir import HFDir
from megatron_p2t.checkpoint.run_dir import RunDir
from megatron_p2t.checkpoint.slicing import copy_into
from megatron_p2t.config import ConfigError
from megatron_p2t.data.loader import ProteinTextLoader
from megatron_p2t.models.align import AlignModel
from megatron_p2t.models.esm import ESMConfig
from megatron_p2t.models.lora import apply_lora
from megatron_p2t.parts import assemble
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device
from megatron_p2t.training.align import align_loss
from megatron_p2t.training.batches import WARMUP, to_device, training_data
from megatron_p2t.training.driver import Stage
from megatron_p2t.training.loss import hscale_scores, rank_of_own
from megatron_p2t.training.text_cache import cache_dir


def build(cfg, layout: Layout) -> AlignModel:
    llama_cfg, esm_cfg, pcfg = assemble.hf_configs(cfg.model)
    torch.manual_seed(cfg.train.seed)  # the fresh connector's initial weights
    model = AlignModel(cfg.model, parts.of(cfg.model), ESMConfig.from_hf(esm_cfg), llama_cfg, pcfg, cfg.align,
                       assemble.dtype_of(cfg.model), text_side=not cfg.align.use_text_cache, layout=layout,
                       train_structure=not cfg.model.freeze.structure)
    assemble.load_esm(model.esm, cfg.model, layout)
    if cfg.model.structure_init and hasattr(model.esm, "structure"):      # a warmup-structure run's distance bias
        src = RunDir.step(cfg.model.structure_init, WARMUP)
        esm_structure_hf.load_run(model.esm, src, layout.tp_rank, layout.tp)
    apply_lora(model.esm, cfg.model.esm_lora, "esm")  # after loading: the adapters wrap the loaded layers
    if model.text is not None:
        assemble.load_text_side(model.text, cfg.model, llama_cfg, layout)
    if cfg.model.connector_weights:     # the connector's weights in its part's HF names
        copy_into(model.connector, model.connector_spec.adapter.tensors(
            HFDir(cfg.model.connector_weights), model.connector, layout.tp_rank, layout.tp),
            cfg.model.connector_weights)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def use_cache_if_asked(cfg):
    """The config with data.text_cache pointing at this config's text cache when align.use_text_cache asks
    for one (and none is named)."""
    if not cfg.align.use_text_cache or cfg.data.text_cache:
        return cfg
    path = cache_dir(cfg)
    if not os.path.exists(os.path.join(path, "cache.json")):
        raise FileNotFoundError(f"{path}: no text cache for this config; run "
                                f"`megatron-p2t cache-text --config ...` with the same settings first")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_cache=path))


def retrieval_eval(model_module, cfg, layout: Layout) -> dict:
    """Protein -> text retrieval over the whole validation split, scored as the loss scores: top-1, top-5 and
    mean rank, each with its chance level."""
    dp_group = layout.dp_group
    vcfg = dataclasses.replace(cfg.data, split="valid", epochs=1, num_workers=0)
    pieces = {"pm": [], "ps": [], "tm": [], "ts": [], "valid": []}
    for batch in ProteinTextLoader(vcfg, layout.dp_rank, layout.dp):
        batch = to_device(batch)
        for names, vectors in ((("pm", "ps"), model_module.protein_vectors(batch)),
                               (("tm", "ts"), model_module.text_vectors(batch))):
            for name, v in zip(names, vectors):
                pieces[name].append(v.float().cpu())
        pieces["valid"].append(batch["valid"].cpu().float())
    vec = {name: torch.cat(v) for name, v in pieces.items()}
    world = dist.get_world_size(dp_group)
    if world > 1:  # every rank ran the same number of equal-size batches, so shapes agree
        for name, x in vec.items():
            x = x.to(collective_device())
            gathered = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(gathered, x, group=dp_group)
            vec[name] = torch.cat(gathered).cpu()
    keep = vec.pop("valid").bool()
    vec = {name: x[keep] for name, x in vec.items()}
    scores = hscale_scores(vec["pm"], vec["ps"], vec["tm"], vec["ts"], tuple(cfg.align.weights), cfg.align.variant)
    rank = rank_of_own(scores)  # texts scoring above the right one
    n = scores.shape[0]
    return {"top1": float((rank < 1).float().mean()), "top5": float((rank < 5).float().mean()),
            "mean_rank": float(rank.float().mean()) + 1, "n": n, "chance_top1": 1.0 / n,
            "chance_top5": min(5, n) / n, "chance_mean_rank": (n + 1) / 2}


class AlignHScale(Stage):
    name = "align"

    def prepare(self, cfg):
        if cfg.parallel.pipeline != 1:
            raise ConfigError("stage 1 runs tensor x data parallel (parallel.pipeline=1): its towers are the frozen "
                              "ESM and the first text_layer decoder layers, which TP already splits")
        if cfg.data.batch_size is None:
            raise ConfigError("stage 1 needs fixed per-rank batches (data.batch_size): negatives are all-gathered "
                              "across data-parallel ranks, which needs equal batch sizes")
        cfg = use_cache_if_asked(cfg)
        return dataclasses.replace(cfg, parallel=cfg.parallel.without_experts())

    def build(self, cfg, layout: Layout):
        return build(cfg, layout)

    def loader(self, cfg, layout: Layout):
        return ProteinTextLoader(training_data(cfg, cfg.data), layout.dp_rank, layout.dp)

    def step(self, cfg, layout: Layout):
        return lambda engine, batch: align_loss(engine, to_device(batch), cfg.align, layout.dp_group)

    def evaluate(self, cfg, layout: Layout):
        return lambda engine: retrieval_eval(engine.module, cfg, layout)
