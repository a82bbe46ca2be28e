"""`megatron-p2t align`: stage 1 on the configured data, model and layout -- H-SCALE for Prot2Text-V2's projector,
LLaVA's feature alignment (run_instruct.feature_alignment) for the other connectors, language modelling on
packed documents for a decoder-only recipe (`pretrain-lm`) (align.objective)."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from megatron_p2t.checkpoint import esm_structure_hf, load, projector_hf, sharded
from megatron_p2t.checkpoint.hf_dir import HFDir
from megatron_p2t.checkpoint.slicing import copy_into
from megatron_p2t.config import ConfigError, check_same_recipe
from megatron_p2t.data.loader import ProteinTextLoader
from megatron_p2t.models.align import AlignModel
from megatron_p2t.models.build import dtype_of
from megatron_p2t.models.esm import ESMConfig
from megatron_p2t.models.lora import apply_lora
from megatron_p2t.models.parts_config import align_objective
from megatron_p2t.parallel import state
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device
from megatron_p2t.training import run_instruct
from megatron_p2t.training.align import align_loss
from megatron_p2t.training.loss import hscale_scores, rank_of_own
from megatron_p2t.training.text_cache import cache_dir
from megatron_p2t.training.trainer import Trainer, resume_dir, with_grad_accum


def _to_device(batch):
    if not torch.cuda.is_available():
        return batch
    return {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def build(cfg, layout: Layout):
    llama_cfg, esm_cfg, pcfg = load.hf_configs(cfg)
    torch.manual_seed(cfg.train.seed)  # the fresh projector's initial weights
    model = AlignModel(ESMConfig.from_hf(esm_cfg), llama_cfg, pcfg, cfg.align, cfg.model.esm_output_layer,
                       dtype_of(cfg), text_side=not cfg.align.use_text_cache, layout=layout,
                       encoder=cfg.model.encoder, structure=cfg.model.structure,
                       train_structure=not cfg.model.freeze.structure,
                       recompute_encoder=cfg.model.recompute.encoder, attention_kernel=cfg.model.attention_kernel)
    load.load_esm(model.esm, cfg, layout)
    if cfg.model.structure_init and hasattr(model.esm, "structure"):      # a warmup-structure run's distance bias
        src = run_instruct.step_dir(cfg.model.structure_init, run_instruct.WARMUP)
        esm_structure_hf.load_run(model.esm, src, layout.tp_rank, layout.tp)
    apply_lora(model.esm, cfg.model.esm_lora, "esm")  # after loading: the adapters wrap the loaded layers
    if model.text is not None:
        load.load_text_side(model.text, cfg, llama_cfg, layout)
    if cfg.model.projector_weights:
        copy_into(model.projector, projector_hf.tensors(HFDir(cfg.model.projector_weights), pcfg, layout.tp_rank,
                                                        layout.tp), cfg.model.projector_weights)
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
    parts = {"pm": [], "ps": [], "tm": [], "ts": [], "valid": []}
    for batch in ProteinTextLoader(vcfg, layout.dp_rank, layout.dp):
        batch = _to_device(batch)
        for names, vectors in ((("pm", "ps"), model_module.protein_vectors(batch)),
                               (("tm", "ts"), model_module.text_vectors(batch))):
            for name, v in zip(names, vectors):
                parts[name].append(v.float().cpu())
        parts["valid"].append(batch["valid"].cpu().float())
    vec = {name: torch.cat(v) for name, v in parts.items()}
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


def run(cfg, resume=None) -> dict:
    objective = align_objective(cfg.align.objective, cfg.model.connector)
    if objective == "feature":
        return run_instruct.run(run_instruct.feature_alignment(cfg), resume)
    if objective == "lm":
        return run_instruct.run(cfg, resume, documents=True)
    if cfg.parallel.pipeline != 1:
        raise ConfigError("stage 1 runs tensor x data parallel (parallel.pipeline=1): its towers are the frozen "
                          "ESM and the first text_layer decoder layers, which TP already splits")
    if cfg.data.batch_size is None:
        raise ConfigError("stage 1 needs fixed per-rank batches (data.batch_size): negatives are all-gathered "
                          "across data-parallel ranks, which needs equal batch sizes")
    if resume:
        check_same_recipe(resume_dir(cfg, resume), cfg, "--resume")
    cfg = use_cache_if_asked(cfg)
    cfg = dataclasses.replace(cfg, parallel=cfg.parallel.without_experts())
    layout = state.initialize(cfg.parallel)
    cfg = with_grad_accum(cfg, cfg.data.batch_size, layout.dp)
    model = build(cfg, layout)
    loader = ProteinTextLoader(run_instruct.training_data(cfg, cfg.data), layout.dp_rank, layout.dp)

    def step_fn(engine, batch):
        return align_loss(engine, _to_device(batch), cfg.align, layout.dp_group)

    def eval_fn(engine):
        return retrieval_eval(engine.module, cfg, layout)

    os.makedirs(cfg.train.save_dir, exist_ok=True)
    sharded.write_run_info(cfg.train.save_dir, cfg, "align")
    return Trainer(model, cfg, loader, step_fn, layout, eval_fn, micro_batch=cfg.data.batch_size).run(resume)
