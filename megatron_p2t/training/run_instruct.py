"""`megatron-p2t instruct`: stage 2, LoRA instruction tuning on the joined model.

ESM frozen, the projector trained fully (from stage 1's), LoRA on the decoder's linears; loss on the answer
tokens only, averaged over this micro-batch's answer tokens. Tensor x pipeline x data parallel on the shared
trainer: with parallel.pipeline > 1 each optimizer step is one megatron-core 1F1B schedule over train.grad_accum
micro-batches (use at least as many as there are stages, or the pipeline idles), the encoder and projector on
the first stage.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import torch
import torch.distributed as dist

from megatron_p2t.checkpoint.hf_dir import CheckpointError


def _to_device(batch):
    if not torch.cuda.is_available():
        return batch
    return {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def stage1_dir(path: str) -> str:
    """A stage-1 run directory (its `latest`) or one of its step directories."""
    if os.path.exists(os.path.join(path, "latest")):
        path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise CheckpointError(f"{path}: not a complete stage-1 checkpoint (no COMPLETE marker); pass the "
                              f"align run's train.save_dir or one of its stepN directories")
    return path


def stage1_tensors(path: str) -> dict:
    """The trained stage-1 parts, whole: projector fc1/fc2 (resharded from any TP) and, when stage 1 trained
    LoRA on ESM, its adapters per stage-1 TP rank."""
    files = sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))
    if not files:
        raise CheckpointError(f"{path}: no mp_rank_*_model_states.pt files (a DeepSpeed checkpoint of `align`?)")
    mods = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    cat = lambda k, d: torch.cat([m[f"projector.{k}"] for m in mods], d)
    return {"projector": {"fc1.weight": cat("fc1.weight", 0), "fc1.bias": cat("fc1.bias", 0),
                          "fc2.weight": cat("fc2.weight", 1), "fc2.bias": mods[0]["projector.fc2.bias"]},
            "esm_lora": [{k[len("esm."):]: v for k, v in m.items() if k.startswith("esm.") and ".lora_" in k}
                         for m in mods]}


def build(cfg):
    from megatron.core import parallel_state as ps

    from megatron_p2t.checkpoint import projector_hf
    from megatron_p2t.checkpoint.hf_dir import TensorSource
    from megatron_p2t.checkpoint.llama_hf import copy_into
    from megatron_p2t.models.build import build as build_model
    from megatron_p2t.models.build import load_hf
    from megatron_p2t.models.lora import apply_lora, load_lora
    if cfg.model.llm_lora.r <= 0:
        raise ValueError("stage 2 trains LoRA on the decoder: set model.llm_lora.r > 0")
    cfg.model.freeze.esm, cfg.model.freeze.projector, cfg.model.freeze.llm = True, False, True
    torch.manual_seed(cfg.train.seed)
    # an `import-p2tv2` checkpoint holds the whole model (Prot2Text-V2 continued with fresh LoRA); its
    # config.json gives the shapes
    imported = bool(cfg.instruct.init_from) and os.path.exists(os.path.join(cfg.instruct.init_from, "metadata.json"))
    if imported:
        cfg.model.p2tv2 = cfg.instruct.init_from
    model, llama_cfg, esm_cfg, pcfg = build_model(cfg)
    if imported:
        from megatron_p2t.checkpoint import sharded
        sharded.load(model, cfg.instruct.init_from)
    else:
        load_hf(model, cfg, llama_cfg, pcfg)
    tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if cfg.instruct.init_from and not imported and model.pre_process:  # the projector lives on the first stage
        src = stage1_dir(cfg.instruct.init_from)
        s1 = stage1_tensors(src)
        copy_into(model.projector, projector_hf.tensors(TensorSource(s1["projector"], src), pcfg, tpr, tp), src)
        if any(s1["esm_lora"]):
            if len(s1["esm_lora"]) != tp:
                raise CheckpointError(f"{src}: stage 1 trained ESM LoRA at tensor-parallel size "
                                      f"{len(s1['esm_lora'])}; run stage 2 at the same parallel.tensor")
            apply_lora(model.esm, cfg.model.esm_lora, "esm")
            load_lora(model.esm, s1["esm_lora"][tpr], src)
            for p in model.esm.parameters():
                p.requires_grad_(False)
    apply_lora(model.llm, cfg.model.llm_lora, "llm")
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, llama_cfg, esm_cfg, pcfg


def param_groups(model, cfg):
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    proj = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projector.")]
    other = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n
             and not n.startswith("projector.")]
    if other:
        raise ValueError(f"unexpected trainable parameters in stage 2: {other[:4]}")
    if not proj and cfg.parallel.pipeline > 1:
        # A later pipeline stage has no projector, but DeepSpeed all-reduces one gradient norm per parameter group
        # over the model-parallel group (tensor x pipeline): every stage must have as many groups as the first,
        # or the stages' collectives pair up wrongly and the step hangs. Its second group is the B halves.
        a = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_A" in n]
        b = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B" in n]
        return [{"params": a, "lr": cfg.train.lr}, {"params": b, "lr": cfg.train.lr}]
    return [{"params": lora, "lr": cfg.train.lr}, {"params": proj, "lr": cfg.instruct.projector_lr or cfg.train.lr}]


def make_loader(cfg, split: str = "train", train: bool = True):
    from megatron_p2t.data.instruct import InstructLoader, MixedLoader, PromptBuilder
    from megatron_p2t.data.loader import ProteinTextLoader
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    if not cfg.data.text_tokenizer:
        raise ValueError("stage 2 needs data.text_tokenizer (the LLaMA tokenizer directory)")
    builder = PromptBuilder(load_text_tokenizer(cfg.data.text_tokenizer), cfg.instruct, cfg.model.placeholder_token,
                            seed=cfg.data.seed)
    if not train:
        dcfg = dataclasses.replace(cfg.data, split=split, epochs=1, num_workers=0)
        return InstructLoader(ProteinTextLoader(dcfg), builder, cfg.instruct, train=False)
    main = InstructLoader(ProteinTextLoader(dataclasses.replace(cfg.data, split=split)), builder, cfg.instruct)
    if not cfg.instruct.mix:
        return main
    loaders, weights = [main], [float(cfg.instruct.main_weight)]
    for m in cfg.instruct.mix:
        if set(m) - {"manifest", "weight"} or "manifest" not in m:
            raise ValueError(f"instruct.mix entries are {{manifest: PATH, weight: W}}, got {m}")
        dcfg = dataclasses.replace(cfg.data, manifest=m["manifest"], split=split)
        loaders.append(InstructLoader(ProteinTextLoader(dcfg), builder, cfg.instruct))
        weights.append(float(m.get("weight", 1.0)))
    return MixedLoader(loaders, weights, seed=cfg.data.seed)


def forward_loss(model, batch):
    from megatron_p2t.parallel.pipeline import masked_mean_loss
    b = _to_device(batch)
    per_tok = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                    protein_ids=b["protein_ids"], protein_mask=b["protein_mask"], labels=b["labels"])
    loss, _ = masked_mean_loss(per_tok, b["loss_mask"])
    return loss, b["loss_mask"].sum()


def from_last_stage(value: float) -> float:
    """A value the last pipeline stage computed (a loss), on every stage of this pipeline."""
    from megatron.core import parallel_state as ps

    from megatron_p2t.parallel.state import collective_device
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    t = torch.tensor([value if ps.is_pipeline_last_stage() else 0.0], dtype=torch.float64, device=collective_device())
    dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return float(t)


def pipeline_step(model, batches, forward_only: bool = False) -> float:
    """Forward (and backward, scaled by 1/len(batches)) of the micro-batches through megatron-core's pipeline
    schedule; the mean of their answer-token losses, on every stage."""
    from megatron_p2t.parallel import pipeline
    out = pipeline.run(model, [_to_device(b) for b in batches], forward_only=forward_only)
    return from_last_stage(sum(float(o["loss"]) for o in out) / len(batches) if out else 0.0)


def valid_loss(model, cfg, dp_group) -> dict:
    """Answer-token cross entropy over the whole validation split (token-weighted across ranks)."""
    from megatron.core import parallel_state as ps

    from megatron_p2t.parallel.state import collective_device
    total = torch.zeros(2, dtype=torch.float64)
    for batch in make_loader(cfg, "valid", train=False):
        if batch is None:  # only padding rows: every stage of this pipeline reads the same batch and skips it
            continue
        n = batch["loss_mask"].sum()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            loss = pipeline_step(model, [batch], forward_only=True)
        else:
            loss, _ = forward_loss(model, batch)
        total += torch.tensor([float(loss) * float(n), float(n)], dtype=torch.float64)
    total = total.to(collective_device())
    dist.all_reduce(total, group=dp_group)
    return {"loss": float(total[0] / total[1].clamp(min=1)), "answer_tokens": int(total[1])}


def run(cfg, resume=None) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_p2t.models.build import write_run_info
    from megatron_p2t.parallel import state
    from megatron_p2t.training.trainer import Trainer, resolve_grad_accum
    pp = cfg.parallel.pipeline
    state.initialize(tp=cfg.parallel.tensor, pp=pp, seed=cfg.parallel.seed,
                     timeout_minutes=cfg.parallel.timeout_minutes)
    resolve_grad_accum(cfg.train, cfg.data.batch_size, ps.get_data_parallel_world_size())
    model, *_ = build(cfg)
    loader = make_loader(cfg)
    dp_group = ps.get_data_parallel_group()

    def step_fn(engine, batch):
        loss, n = forward_loss(engine, batch)
        return loss, {"answer_tokens": n}

    def whole_step_fn(engine, batches):
        return pipeline_step(engine.module, batches), {"answer_tokens": sum(b["loss_mask"].sum() for b in batches)}

    os.makedirs(cfg.train.save_dir, exist_ok=True)
    write_run_info(cfg.train.save_dir, cfg)
    trainer = Trainer(model, cfg, loader, whole_step_fn if pp > 1 else step_fn,
                      lambda engine: valid_loss(engine.module, cfg, dp_group), micro_batch=1,
                      param_groups=param_groups(model, cfg), whole_step=pp > 1)
    return trainer.run(resume)
