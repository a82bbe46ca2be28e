"""`megatron-p2t instruct`: stage 2, LoRA instruction tuning on the joined model.

ESM frozen, the connector trained fully (from stage 1's), LoRA on the decoder's linears; loss on the answer
tokens only, averaged over this micro-batch's answer tokens. With model.llm_lora.r=0 the same step is LLaVA's
feature alignment (Protein2Text's stage 1, which `align` runs through `feature_alignment`): the decoder stays
frozen without adapters and the connector alone learns from the next-token loss; stage 2 continues from it
through instruct.init_from. Tensor x pipeline x data parallel on the shared trainer: with parallel.pipeline > 1
each optimizer step is one megatron-core 1F1B schedule over train.grad_accum micro-batches (use at least as many
as there are stages, or the pipeline idles), the encoder and connector on the first stage.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os

import torch
import torch.distributed as dist

from megatron_p2t.checkpoint import esm_structure_hf, llama_hf, load, projector_hf, resampler_hf, sharded
from megatron_p2t.checkpoint.hf_dir import CheckpointError, TensorSource
from megatron_p2t.checkpoint.slicing import copy_into
from megatron_p2t.config import ConfigError, check_same_recipe
from megatron_p2t.data.instruct import InstructLoader, MixedLoader, PromptBuilder
from megatron_p2t.data.lm import DocumentLoader
from megatron_p2t.data.loader import ProteinTextLoader
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from megatron_p2t.models import llama_moe
from megatron_p2t.models.lora import apply_lora
from megatron_p2t.models.parts_config import FreezeConfig, protein_slots
from megatron_p2t.parallel import pipeline, state
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device
from megatron_p2t.training.trainer import Trainer, check_optimizer, resume_dir, with_grad_accum


def _to_device(batch):
    if not torch.cuda.is_available():
        return batch
    return {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


STAGE1 = "the stage-1 run (`align`) in instruct.init_from"
WARMUP = "the `warmup-structure` run in model.structure_init"


def step_dir(path: str, what: str) -> str:
    """A run's directory (its `latest`) or one of its step directories -> that complete step directory. `what`
    names the run expected and the option that gave it, for the error."""
    fix = f"pass {what}: a run's train.save_dir or one of its stepN directories"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory; {fix}")
    if os.path.exists(os.path.join(path, "latest")):
        path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker: a step cut short while it was "
                              f"written, or not a run's directory); {fix}")
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


def connector_shards(path: str, connector: str) -> list:
    """A run's trained connector (resampler / mlp2x_gelu), one state dict per tensor-parallel rank of that run:
    the files of its first pipeline stage, which holds the connector."""
    files = sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))
    mods = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    shards = [{k[len("connector."):]: v for k, v in m.items() if k.startswith("connector.")} for m in mods]
    shards = [s for s in shards if s]
    if not shards:
        raise CheckpointError(f"{path}: no connector.* tensors, so nothing to start model.connector={connector} "
                              f"from; instruct.init_from names a run that trained it (feature alignment: `instruct` "
                              f"with model.llm_lora.r=0). An `align` run trains Prot2Text-V2's projector only")
    return shards


def imported(cfg) -> bool:
    """instruct.init_from names an `import-p2tv2` checkpoint (the whole model, continued with fresh LoRA)."""
    return bool(cfg.instruct.init_from) and os.path.exists(os.path.join(cfg.instruct.init_from, "metadata.json"))


def feature_alignment(cfg):
    """The run config of LLaVA's feature alignment (Protein2Text's stage 1, what `align` runs for
    align.objective=feature): this command with the decoder frozen and no adapters (model.llm_lora is stage 2's),
    on data.manifest's sequence-function pairs (instruct.mix is stage 2's), from a fresh connector at train.lr
    (instruct.projector_lr is stage 2's)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llm_lora=dataclasses.replace(
        cfg.model.llm_lora, r=0)), instruct=dataclasses.replace(cfg.instruct, mix=[], init_from=None,
                                                                projector_lr=None))


def stage2_config(cfg):
    """The run config as stage 2 runs it: ESM and decoder frozen (LoRA, when r > 0, trains on the decoder), the
    connector trained; an imported checkpoint as instruct.init_from names the model's shapes too (model.p2tv2)."""
    if cfg.model.llm_lora.r <= 0 and cfg.parallel.pipeline > 1:
        raise ConfigError("model.llm_lora.r=0 (feature alignment: the connector alone learns) leaves the later "
                          "pipeline stages nothing to train; run it with parallel.pipeline=1 (tensor and data "
                          "parallelism apply), or give the decoder adapters (model.llm_lora.r > 0)")
    if cfg.model.encoder == "none" and cfg.instruct.init_from:
        raise ConfigError(f"instruct.init_from={cfg.instruct.init_from}: a decoder-only recipe continues from "
                          f"its stage 1 through that run's export, as ProLLaMA continues from ProLLaMA_Stage_1: "
                          f"`megatron-p2t export --checkpoint RUN --out EXPORT`, then model.llama=EXPORT/llama "
                          f"(and instruct.init_from= empty)")
    model = dataclasses.replace(cfg.model, freeze=FreezeConfig(esm=True, projector=False, llm=True,
                                                               structure=cfg.model.freeze.structure))
    if imported(cfg):
        model = dataclasses.replace(model, p2tv2=cfg.instruct.init_from)
    return dataclasses.replace(cfg, model=model)


def build(cfg, layout: Layout):
    cfg = stage2_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model, llama_cfg, esm_cfg, pcfg = load.build_model(cfg, layout)
    if imported(cfg):
        sharded.load(model, cfg.instruct.init_from)
    else:
        load.load_hf(model, cfg, llama_cfg, pcfg, layout)
    tp, tpr = layout.tp, layout.tp_rank
    if cfg.instruct.init_from and not imported(cfg) and model.pre_process and model.connector_name != "mlp":
        src = step_dir(cfg.instruct.init_from, STAGE1)
        whole = resampler_hf.whole(connector_shards(src, cfg.model.connector), model.connector)
        copy_into(model.connector, resampler_hf.tensors(TensorSource(whole, src), model.connector, tpr, tp), src)
    elif cfg.instruct.init_from and not imported(cfg) and model.pre_process:  # the projector is on the first stage
        src = step_dir(cfg.instruct.init_from, STAGE1)
        s1 = stage1_tensors(src)
        copy_into(model.projector, projector_hf.tensors(TensorSource(s1["projector"], src), pcfg, tpr, tp), src)
        if any(s1["esm_lora"]):
            if len(s1["esm_lora"]) != tp:
                raise CheckpointError(f"{src}: stage 1 trained ESM LoRA at tensor-parallel size "
                                      f"{len(s1['esm_lora'])}; run stage 2 at the same parallel.tensor")
            apply_lora(model.esm, cfg.model.esm_lora, "esm")
            llama_hf.load_lora(model.esm, s1["esm_lora"][tpr], src)
            for p in model.esm.parameters():
                p.requires_grad_(False)
    structured = hasattr(getattr(model, "esm", None), "structure")    # this stage holds a structure-aware encoder
    if cfg.instruct.init_from and not imported(cfg) and structured:
        esm_structure_hf.load_run(model.esm, step_dir(cfg.instruct.init_from, STAGE1), tpr, tp)
    elif cfg.model.structure_init and structured:
        esm_structure_hf.load_run(model.esm, step_dir(cfg.model.structure_init, WARMUP), tpr, tp)
    model.set_freeze(cfg.model.freeze)   # after stage 1's ESM adapters: frozen with ESM, the distance bias trained
    apply_lora(model.llm, cfg.model.llm_lora, "llm")   # r=0: none, the decoder stays frozen
    if cfg.model.decoder == "llama_moe" and cfg.model.llm_lora.r > 0:
        llama_moe.train_experts(model.llm)             # routers and experts train fully beside the adapters
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, llama_cfg, esm_cfg, pcfg


def param_groups(model, cfg):
    """The adapters (with the decoder modules trained fully beside them, model.llm_lora.modules_to_save, and a
    mixture of experts' routers and experts) at train.lr, the connector at instruct.projector_lr."""
    saved = tuple(f"llm.{m}." for m in cfg.model.llm_lora.modules_to_save)
    saved += tuple(n + "." for n, m in model.named_modules() if isinstance(m, llama_moe.DecoderMoELayer))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and (".lora_" in n or n.startswith(saved))]
    connector = ("projector.", "connector.", "esm.structure.")   # the distance bias learns at the connector's rate
    proj = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(connector)]
    other = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n
             and not n.startswith(connector + saved)]
    if other:
        raise ValueError(f"unexpected trainable parameters in stage 2: {other[:4]}")
    if not proj and cfg.parallel.pipeline > 1:
        # A later pipeline stage has no projector, but DeepSpeed all-reduces one gradient norm per parameter group
        # over the model-parallel group (tensor x pipeline): every stage must have as many groups as the first,
        # or the stages' collectives pair up wrongly and the step hangs. Its second group is the B halves.
        a = [p for n, p in model.named_parameters() if p.requires_grad and (".lora_A" in n or n.startswith(saved))]
        b = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B" in n]
        return [{"params": a, "lr": cfg.train.lr}, {"params": b, "lr": cfg.train.lr}]
    groups = [{"params": lora, "lr": cfg.train.lr}, {"params": proj, "lr": cfg.instruct.projector_lr or cfg.train.lr}]
    return [g for g in groups if g["params"]]   # feature alignment (llm_lora.r=0): the connector's group only


def _slots(connector: str, resampler, esm_tokens: int) -> int:
    return protein_slots(connector, resampler, esm_tokens - 2)   # ESM tokens: residues + <cls> + <eos>


def stage_data(cfg, documents: bool):
    """The data settings the stage reads with: language-model documents fill up to a row (less its <bos>), and a
    longer one arrives as a random window of it; answers keep their start and their end token."""
    if not documents:
        return cfg.data
    return dataclasses.replace(cfg.data, text_crop="window",
                               max_text_tokens=(cfg.instruct.pack_length or cfg.data.max_text_tokens + 1) - 1)


def training_data(cfg, data):
    """Training reads leave a protein's structure out with model.structure.dropout (evaluation reads keep all)."""
    return dataclasses.replace(data, structure_dropout=cfg.model.structure.dropout) if data.structure else data


def check_data(cfg) -> None:
    """What make_loader refuses, checkable before a process group starts."""
    if not cfg.data.text_tokenizer:
        raise ConfigError("stage 2 needs data.text_tokenizer (the LLaMA tokenizer directory)")
    for m in cfg.instruct.mix:
        if not isinstance(m, dict) or set(m) - {"manifest", "weight"} or "manifest" not in m:
            raise ConfigError(f"instruct.mix entries are {{manifest: PATH, weight: W}}, got {m}")


def make_loader(cfg, layout: Layout, split: str = "train", train: bool = True, documents: bool = False):
    """Stage-2 prompts, or (documents) language-model documents for a decoder-only recipe's stage 1; drawn from
    data.manifest and, by weight, instruct.mix."""
    check_data(cfg)
    tok = load_text_tokenizer(cfg.data.text_tokenizer, cfg.data.text_end)
    placeholder = cfg.model.placeholder_token if cfg.model.encoder != "none" else None
    builder = PromptBuilder(tok, cfg.instruct, placeholder, seed=cfg.data.seed, end_token=cfg.data.text_end)
    slots = functools.partial(_slots, cfg.model.connector, cfg.model.resampler)

    data = stage_data(cfg, documents)

    def wrap(loader, train_):
        if documents:
            return DocumentLoader(loader, tok.bos_token_id, cfg.instruct.pack_length, cfg.instruct.pack)
        return InstructLoader(loader, builder, cfg.instruct, train=train_, slots=slots)

    if not train:
        dcfg = dataclasses.replace(data, split=split, epochs=1, num_workers=0)
        return wrap(ProteinTextLoader(dcfg, layout.dp_rank, layout.dp), False)
    data = training_data(cfg, data)
    main = wrap(ProteinTextLoader(dataclasses.replace(data, split=split), layout.dp_rank, layout.dp), True)
    if not cfg.instruct.mix:
        return main
    loaders, weights = [main], [float(cfg.instruct.main_weight)]
    for m in cfg.instruct.mix:
        dcfg = dataclasses.replace(data, manifest=m["manifest"], split=split)
        loaders.append(wrap(ProteinTextLoader(dcfg, layout.dp_rank, layout.dp), True))
        weights.append(float(m.get("weight", 1.0)))
    return MixedLoader(loaders, weights, seed=cfg.data.seed)


def forward_loss(model, batch):
    b = _to_device(batch)
    per_tok = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                    protein_ids=b["protein_ids"], protein_mask=b["protein_mask"], labels=b["labels"],
                    protein_coords=b.get("protein_coords"), coords_mask=b.get("coords_mask"),
                    padding_mask=b.get("padding_mask"))
    loss, _ = pipeline.masked_mean_loss(per_tok, b["loss_mask"])
    return loss, b["loss_mask"].sum()


def from_last_stage(value: float, layout: Layout) -> float:
    """A value the last pipeline stage computed (a loss), on every stage of this pipeline."""
    if layout.pp == 1:
        return value
    t = torch.tensor([value if layout.last_stage else 0.0], dtype=torch.float64, device=collective_device())
    dist.broadcast(t, layout.pp_last_rank, group=layout.pp_group)
    return float(t)


def pipeline_step(model, batches, layout: Layout, forward_only: bool = False) -> float:
    """Forward (and backward, scaled by 1/len(batches)) of the micro-batches through megatron-core's pipeline
    schedule; the mean of their answer-token losses, on every stage."""
    out = pipeline.run(model, [_to_device(b) for b in batches], forward_only=forward_only)
    return from_last_stage(sum(float(o["loss"]) for o in out) / len(batches) if out else 0.0, layout)


def valid_loss(model, cfg, layout: Layout, documents: bool = False) -> dict:
    """Answer-token (documents: every token's) cross entropy over the whole validation split (token-weighted
    across ranks)."""
    total = torch.zeros(2, dtype=torch.float64)
    for batch in make_loader(cfg, layout, "valid", train=False, documents=documents):
        if batch is None:  # only padding rows: every stage of this pipeline reads the same batch and skips it
            continue
        n = batch["loss_mask"].sum()
        if layout.pp > 1:
            loss = pipeline_step(model, [batch], layout, forward_only=True)
        else:
            loss, _ = forward_loss(model, batch)
        total += torch.tensor([float(loss) * float(n), float(n)], dtype=torch.float64)
    total = total.to(collective_device())
    dist.all_reduce(total, group=layout.dp_group)
    return {"loss": float(total[0] / total[1].clamp(min=1)), "answer_tokens": int(total[1])}


def run(cfg, resume=None, documents: bool = False) -> dict:
    """Stage 2; with documents, a decoder-only recipe's stage 1 (`pretrain-lm`: language modelling on packed
    documents, the same model step)."""
    if documents and cfg.model.encoder != "none":
        raise ConfigError(f"language-model pretraining (`pretrain-lm`) trains a decoder-only recipe "
                          f"(model.encoder=none, model.connector=none); this config has model.encoder="
                          f"{cfg.model.encoder}")
    check_optimizer(cfg, whole_step=cfg.parallel.pipeline > 1, experts=cfg.parallel.expert > 1)
    stage = stage2_config(cfg)  # its refusals too: all before any process group
    check_data(cfg)
    if cfg.instruct.init_from:
        check_same_recipe(cfg.instruct.init_from, cfg, "instruct.init_from")
    if resume:
        check_same_recipe(resume_dir(cfg, resume), cfg, "--resume")
    layout = state.initialize(cfg.parallel)
    cfg = with_grad_accum(stage, cfg.data.batch_size, layout.dp)
    model, *_ = build(cfg, layout)
    loader = make_loader(cfg, layout, documents=documents)

    def step_fn(engine, batch):
        loss, n = forward_loss(engine, batch)
        return loss, {"answer_tokens": n}

    def whole_step_fn(engine, batches):
        return (pipeline_step(engine.module, batches, layout),
                {"answer_tokens": sum(b["loss_mask"].sum() for b in batches)})

    os.makedirs(cfg.train.save_dir, exist_ok=True)
    sharded.write_run_info(cfg.train.save_dir, cfg, "pretrain-lm" if documents else
                           "instruct" if cfg.model.llm_lora.r > 0 else "align-feature")
    trainer = Trainer(model, cfg, loader, whole_step_fn if layout.pp > 1 else step_fn, layout,
                      lambda engine: valid_loss(engine.module, cfg, layout, documents), micro_batch=1,
                      param_groups=param_groups(model, cfg), whole_step=layout.pp > 1)
    return trainer.run(resume)
