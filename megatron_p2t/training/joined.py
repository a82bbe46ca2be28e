"""The joined model's next-token step, shared by the stages that train it (training/stages/instruct.py:
instruction tuning, LLaVA's feature alignment, language-model pretraining) and by export: the config as stage 2
runs it, the model built and started from what the config names, the parameter groups, the prompt / document
loaders, the loss, the pipeline schedule and the validation loss.

ESM frozen, the connector trained fully (from stage 1's), LoRA on the decoder's linears; loss on the answer
tokens only, averaged over this micro-batch's answer tokens. With model.llm_lora.r=0 the same step is LLaVA's
feature alignment (Protein2Text's stage 1): the decoder stays frozen without adapters and the connector alone
learns from the next-token loss; stage 2 continues from it through instruct.init_from. Tensor x pipeline x data
parallel on the shared trainer: with parallel.pipeline > 1 each optimizer step is one megatron-core 1F1B schedule
over train.grad_accum micro-batches (use at least as many as there are stages, or the pipeline idles), the
encoder and connector on the first stage.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from megatron_p2t import parts
from megatron_p2t.checkpoint import esm_structure_hf, export_hf, llama_hf, sharded
from megatron_p2t.checkpoint.hf_dir import CheckpointError, TensorSource
from megatron_p2t.checkpoint.run_dir import RunDir
from megatron_p2t.checkpoint.slicing import copy_into
from megatron_p2t.config import ConfigError
from megatron_p2t.data.instruct import InstructLoader, MixedLoader, PromptBuilder
from megatron_p2t.data.lm import DocumentLoader
from megatron_p2t.data.loader import ProteinTextLoader
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from megatron_p2t.models import llama_moe
from megatron_p2t.models.lora import apply_lora
from megatron_p2t.models.p2t import current_name
from megatron_p2t.models.parts_config import FreezeConfig
from megatron_p2t.parts import assemble
from megatron_p2t.parallel import pipeline
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.parallel.state import collective_device
from megatron_p2t.training.batches import STAGE1, WARMUP, to_device, training_data


def esm_lora_shards(modules: list) -> list:
    """The ESM adapters a stage-1 run trained (stage-1 ESM LoRA), from its module state dicts
    (RunDir.module_states), one per tensor-parallel rank of it (empty ones when it trained none)."""
    return [{k[len("esm."):]: v for k, v in m.items() if k.startswith("esm.") and ".lora_" in k} for m in modules]


def connector_shards(modules: list, path: str, connector: str) -> list:
    """A run's trained connector, from its module state dicts (RunDir.module_states), one per tensor-parallel rank
    of that run: the files of its first pipeline stage, which holds the connector (runs written before the rename
    hold Prot2Text-V2's as `projector.*`)."""
    shards = []
    for m in modules:
        named = {current_name(k): v for k, v in m.items()}
        shards.append({k[len("connector."):]: v for k, v in named.items() if k.startswith("connector.")})
    shards = [s for s in shards if s]
    if not shards:
        raise CheckpointError(f"{path}: no connector.* tensors, so nothing to start model.connector={connector} "
                              f"from; instruct.init_from names a run that trained it (stage 1: `align`, or feature "
                              f"alignment: `instruct` with model.llm_lora.r=0)")
    return shards


def connector_whole(shards: list, module, adapter) -> dict:
    """The connector's tensors whole, in its HF names, from the state dicts of every tensor-parallel rank of a run
    (in rank order): what the adapter then reads at this run's layout."""
    return export_hf.whole(s for rank, sd in enumerate(shards) for s in adapter.slices(module, rank, len(shards), sd))


def imported(cfg) -> bool:
    """instruct.init_from names an `import-p2tv2` checkpoint (the whole model, continued with fresh LoRA)."""
    return RunDir.is_import(cfg.instruct.init_from)


def feature_alignment(cfg):
    """The run config of LLaVA's feature alignment (Protein2Text's stage 1, what `align` runs for
    align.objective=feature): this command with the decoder frozen and no adapters (model.llm_lora is stage 2's),
    on data.manifest's sequence-function pairs (instruct.mix is stage 2's), from a fresh connector at train.lr
    (instruct.connector_lr is stage 2's)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llm_lora=dataclasses.replace(
        cfg.model.llm_lora, r=0)), instruct=dataclasses.replace(cfg.instruct, mix=[], init_from=None,
                                                                connector_lr=None))


def stage2_config(cfg):
    """The run config as stage 2 runs it: ESM and decoder frozen (LoRA, when r > 0, trains on the decoder), the
    connector trained; an imported checkpoint as instruct.init_from names the model's shapes too (model.p2tv2)."""
    if cfg.model.llm_lora.r <= 0 and cfg.parallel.pipeline > 1:
        raise ConfigError("model.llm_lora.r=0 (feature alignment: the connector alone learns) leaves the later "
                          "pipeline stages nothing to train; run it with parallel.pipeline=1 (tensor and data "
                          "parallelism apply), or give the decoder adapters (model.llm_lora.r > 0)")
    if not parts.encoder(cfg.model.encoder).reads_protein and cfg.instruct.init_from:
        raise ConfigError(f"instruct.init_from={cfg.instruct.init_from}: a decoder-only recipe continues from "
                          f"its stage 1 through that run's export, as ProLLaMA continues from ProLLaMA_Stage_1: "
                          f"`megatron-p2t export --checkpoint RUN --out EXPORT`, then model.llama=EXPORT/llama "
                          f"(and instruct.init_from= empty)")
    model = dataclasses.replace(cfg.model, freeze=FreezeConfig(esm=True, connector=False, llm=True,
                                                               structure=cfg.model.freeze.structure))
    if imported(cfg):
        model = dataclasses.replace(model, p2tv2=cfg.instruct.init_from)
    return dataclasses.replace(cfg, model=model)


def build(cfg, layout: Layout):
    cfg = stage2_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model, llama_cfg, esm_cfg, pcfg = assemble.build_model(cfg.model, cfg.data, layout)
    if imported(cfg):
        sharded.load(model, cfg.instruct.init_from)
    else:
        assemble.load_hf(model, cfg.model, llama_cfg, pcfg, layout)
    tp, tpr = layout.tp, layout.tp_rank
    if cfg.instruct.init_from and not imported(cfg) and model.pre_process:   # the connector: on the first stage
        src = RunDir.step(cfg.instruct.init_from, STAGE1)
        modules = RunDir.module_states(src)            # read (and checked against its checksums) once
        adapter = model.connector_spec.adapter
        whole = connector_whole(connector_shards(modules, src, cfg.model.connector), model.connector, adapter)
        copy_into(model.connector, adapter.tensors(TensorSource(whole, src), model.connector, tpr, tp), src)
        esm_lora = esm_lora_shards(modules)
        if any(esm_lora):
            if len(esm_lora) != tp:
                raise CheckpointError(f"{src}: stage 1 trained ESM LoRA at tensor-parallel size {len(esm_lora)}; "
                                      f"run stage 2 at the same parallel.tensor")
            apply_lora(model.esm, cfg.model.esm_lora, "esm")
            llama_hf.load_lora(model.esm, esm_lora[tpr], src)
            for p in model.esm.parameters():
                p.requires_grad_(False)
    structured = hasattr(getattr(model, "esm", None), "structure")    # this stage holds a structure-aware encoder
    if cfg.instruct.init_from and not imported(cfg) and structured:
        esm_structure_hf.load_run(model.esm, RunDir.step(cfg.instruct.init_from, STAGE1), tpr, tp)
    elif cfg.model.structure_init and structured:
        esm_structure_hf.load_run(model.esm, RunDir.step(cfg.model.structure_init, WARMUP), tpr, tp)
    model.set_freeze(cfg.model.freeze)   # after stage 1's ESM adapters: frozen with ESM, the distance bias trained
    apply_lora(model.llm, cfg.model.llm_lora, "llm")   # r=0: none, the decoder stays frozen
    if assemble.moe_of(cfg.model) is not None and cfg.model.llm_lora.r > 0:
        llama_moe.train_experts(model.llm)             # routers and experts train fully beside the adapters
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, llama_cfg, esm_cfg, pcfg


def param_groups(model, cfg):
    """The adapters (with the decoder modules trained fully beside them, model.llm_lora.modules_to_save, and a
    mixture of experts' routers and experts) at train.lr, the connector at instruct.connector_lr."""
    saved = tuple(f"llm.{m}." for m in cfg.model.llm_lora.modules_to_save)
    saved += tuple(n + "." for n, m in model.named_modules() if isinstance(m, llama_moe.DecoderMoELayer))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and (".lora_" in n or n.startswith(saved))]
    connector = ("connector.", "esm.structure.")   # the distance bias learns at the connector's rate
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
    groups = [{"params": lora, "lr": cfg.train.lr}, {"params": proj, "lr": cfg.instruct.connector_lr or cfg.train.lr}]
    return [g for g in groups if g["params"]]   # feature alignment (llm_lora.r=0): the connector's group only


def _slots(model_cfg, esm_tokens: int) -> int:
    return parts.slots(model_cfg, esm_tokens - 2)   # ESM tokens: residues + <cls> + <eos>


def stage_data(cfg, documents: bool):
    """The data settings the stage reads with: language-model documents fill up to a row (less its <bos>), and a
    longer one arrives as a random window of it; answers keep their start and their end token."""
    if not documents:
        return cfg.data
    return dataclasses.replace(cfg.data, text_crop="window",
                               max_text_tokens=(cfg.instruct.pack_length or cfg.data.max_text_tokens + 1) - 1)


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
    placeholder = cfg.model.placeholder_token if parts.encoder(cfg.model.encoder).reads_protein else None
    builder = PromptBuilder(tok, cfg.instruct, placeholder, seed=cfg.data.seed, end_token=cfg.data.text_end)
    slots = functools.partial(_slots, cfg.model)

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
    b = to_device(batch)
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
    out = pipeline.run(model, [to_device(b) for b in batches], forward_only=forward_only)
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
