"""Run configuration: nested dataclasses, loaded from YAML, overridable as `section.key=value` on the CLI."""
from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, List, Optional

import yaml

from megatron_p2t import parts
from megatron_p2t.data.instruct import InstructConfig
from megatron_p2t.data.loader import LoaderConfig
from megatron_p2t.models.parts_config import (SAVABLE, FreezeConfig, LoRAConfig, MoEConfig, ProjectorConfig,
                                             RecomputeConfig, ResamplerConfig, StructureConfig, check_recompute)
from megatron_p2t.parallel.layout import ParallelConfig
from megatron_p2t.transformer.attention_kernels import ATTENTION_KERNELS


@dataclasses.dataclass
class ModelConfig:
    # the parts by name (the registry, parts/, lists them): encoder -> connector -> decoder
    encoder: str = "esm2"
    connector: str = "mlp"                           # mlp (Prot2Text-V2), mlp2x_gelu, resampler (Protein2Text)
    decoder: str = "llama"
    resampler: ResamplerConfig = dataclasses.field(default_factory=ResamplerConfig)
    structure: StructureConfig = dataclasses.field(default_factory=StructureConfig)   # encoder=esm2_structure
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)                     # decoder=llama_moe
    # a `warmup-structure` run: its trained distance bias starts this stage (stage 1, or stage 2 without init_from)
    structure_init: Optional[str] = None
    # local HF directories: the protein encoder's (EsmModel / EsmForMaskedLM ...; was model.esm) and LlamaForCausalLM
    encoder_path: str = "facebook/esm2_t36_3B_UR50D"
    llama: str = "meta-llama/Llama-3.1-8B-Instruct"
    projector: ProjectorConfig = dataclasses.field(default_factory=lambda: ProjectorConfig(input_dim=0, output_dim=0))
    # the connector's weights in its part's HF names (fc1/fc2 for Prot2Text-V2's projector, the released
    # mm_resampler / mm_projector for Protein2Text's); None: fresh. Was model.projector_weights
    connector_weights: Optional[str] = None
    # a published Prot2Text-V2 directory (esm2llama_instruct): ESM, adapter and LLaMA all come from it, read
    # lazily per rank; model.encoder_path / model.llama / model.connector_weights are then not used
    p2tv2: Optional[str] = None
    esm_output_layer: int = -1                       # Prot2Text-V2: last; Protein2Text: -2
    placeholder_token: str = "<|reserved_special_token_1|>"
    freeze: FreezeConfig = dataclasses.field(default_factory=FreezeConfig)
    # LoRA on ESM's attention (the paper trains it in stage 1, the released code does not): r=0 is off
    esm_lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    # stage 2's adapters on every decoder linear; alpha 2r and dropout 0.1 as Prot2Text-V2
    llm_lora: LoRAConfig = dataclasses.field(default_factory=lambda: LoRAConfig(
        r=16, targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
    dtype: str = "float32"                           # bfloat16 on GPUs
    # the decoder's SwiGLU and bias-dropout-add as megatron-core's fused kernels (Megatron-LM's default), compiled by
    # torch.compile at the first step (Triton on a GPU, a C++ compiler on a CPU); the same values, gradients within
    # rounding. Off until bench/gpu/run.sh has measured it on the GPU in use
    fused_kernels: bool = False
    # attention over packed rows: the decoder's, and ESM's and the text side's unpadded batches
    # (transformer/attention_kernels.py): auto takes flash-attn's varlen kernel, else PyTorch's, else SDPA per sample
    attention_kernel: str = "auto"
    # the decoder's activation recompute (full: each chunk of layers keeps only its input; parts_config.py)
    recompute: RecomputeConfig = dataclasses.field(default_factory=RecomputeConfig)


@dataclasses.dataclass
class AlignConfig:
    """Stage 1. objective: auto (H-SCALE for model.connector=mlp, feature alignment for the others), hscale or
    feature (parts.ALIGN_OBJECTIVES); the other keys are H-SCALE's."""
    objective: str = "auto"
    text_layer: int = 16               # LLaMA layer whose states are pooled (16 of 32 in Prot2Text-V2)
    variant: str = "paper"             # paper: 0.7 mean + 0.3 std InfoNCE; concat: released code
    weights: List[float] = dataclasses.field(default_factory=lambda: [0.7, 0.3])
    temperature: float = 0.05
    learnable_temperature: bool = False
    symmetric: bool = False            # protein->text only, as the paper; True adds text->protein
    gather_negatives: bool = True      # negatives from every data-parallel rank
    use_text_cache: bool = False       # read `megatron-p2t cache-text` vectors; the decoder is not built


@dataclasses.dataclass
class WarmupConfig:
    """`megatron-p2t warmup-structure` (SEPIT's first stage, model.encoder=esm2_structure): contrastive loss of
    pooled encoder states against a frozen text encoder (negatives gathered over data-parallel ranks), masked
    residues, coordinate denoising; the weights of the three."""
    text_encoder: str = ""             # a BERT-family HF directory (AutoModel + AutoTokenizer)
    dim: int = 256                     # the shared space of the contrastive loss
    temperature: float = 0.07
    gather_negatives: bool = True
    mask_fraction: float = 0.15        # residues masked for the MLM loss (80% <mask>, 10% random, 10% kept)
    weights: List[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])  # contrastive, mlm, denoise


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    # samples per optimizer step over all ranks (Megatron's --global-batch-size); when set, grad_accum follows
    # from it: global_batch / (data.batch_size x data-parallel size), which must divide exactly
    global_batch: Optional[int] = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    adam_betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-6
    clip_grad: float = 1.0
    zero_stage: int = 1
    deepspeed_config: Optional[str] = None   # a DeepSpeed JSON whose keys override the ones built from here
    save_dir: str = "runs/align"
    save_every: int = 100
    keep_last: int = 3
    eval_every: int = 0                      # 0: only at the end
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    # save_dir is held by one job at a time (checkpoint/run_dir.RunLock); a lock whose heartbeat stopped this long
    # ago (a job killed on another host) is taken over
    lock_stale_minutes: float = 5.0
    seed: int = 1234
    tensorboard: bool = True


@dataclasses.dataclass
class Config:
    data: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    instruct: InstructConfig = dataclasses.field(default_factory=InstructConfig)
    warmup: WarmupConfig = dataclasses.field(default_factory=WarmupConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # modules imported before the parts are looked up: parts of your own register themselves there
    # (megatron_p2t.parts.register; docs/architecture.md), as torchtitan's experimental.custom_import
    imports: List[str] = dataclasses.field(default_factory=list)


class ConfigError(ValueError):
    pass


# keys renamed when every part got a neutral name: a config, launch script or saved run with the old name still
# loads, read as the new one, with a message naming it (once per key and process)
RENAMED = {"model.esm": "model.encoder_path", "model.projector_weights": "model.connector_weights",
           "model.freeze.projector": "model.freeze.connector", "instruct.projector_lr": "instruct.connector_lr"}
_told = set()


def _renamed(dotted: str, have=()) -> str:
    new = RENAMED.get(dotted)
    if new is None:
        return dotted
    if new.rpartition(".")[2] in have:
        raise ConfigError(f"{dotted} and {new} both given: {dotted} is the old name of {new}; keep {new}")
    if dotted not in _told:
        _told.add(dotted)
        print(f"config: {dotted} is now {new} (read as {new}); rename it in your config or command line",
              file=sys.stderr, flush=True)
    return new


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "whole numbers", float: "numbers", bool: "trues or falses", str: "strings"}


def _describe(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin in (list, List):
        return f"a list of {_PLURAL.get(args[0], 'values') if args else 'values'}"
    return _TYPE_WORDS.get(t, getattr(t, "__name__", str(t)))


def typed(value, t, key: str):
    """`value` (from YAML or a section.key=value override) as the field's type, or a ConfigError naming the key,
    the value and the type. YAML 1.1 reads `1e-4` as a string: a number field takes it as the number it
    spells; a whole-number field takes neither 2.5 nor `ten` nor true, a string field no mapping."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    bad = ConfigError(f"{key}={value!r}: expected {_describe(t)}")
    if t is Any or t is typing.Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return typed(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin in (list, List):
        if not isinstance(value, list):
            raise bad
        return [typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict, typing.Dict) or t is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value        # an int stays one: what a run writes from it (JSON, PEFT's lora_alpha) is unchanged
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if t is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value if isinstance(value, str) else str(value)
        raise bad
    return value


# the values a key can take beyond its type: (lowest, highest) inclusive, None for no bound; checked when the config
# loads, so a run never starts with them (a negative step count, ZeRO stage 7, a batch of 0)
RANGES = {
    "train.steps": (1, None), "train.grad_accum": (1, None), "train.global_batch": (1, None),
    "train.save_every": (1, None), "train.keep_last": (1, None), "train.eval_every": (0, None),
    "train.log_every": (1, None), "train.max_nonfinite_in_a_row": (1, None), "train.zero_stage": (0, 3),
    "train.lr": (0, None), "train.min_lr_ratio": (0, 1), "train.warmup_fraction": (0, 1),
    "train.weight_decay": (0, None), "train.lock_stale_minutes": (0.1, None), "train.clip_grad": (0, None),
    "train.adam_eps": (0, None),
    "data.batch_size": (1, None), "data.max_tokens": (1, None), "data.max_protein_residues": (1, None),
    "data.max_text_tokens": (1, None), "data.shuffle_block": (1, None), "data.chunk": (1, None),
    "data.num_workers": (0, None), "data.prefetch_factor": (1, None), "data.epochs": (1, None),
    "data.structure_dropout": (0, 1),
    "parallel.tensor": (1, None), "parallel.pipeline": (1, None), "parallel.expert": (1, None),
    "parallel.timeout_minutes": (0, None),
    "instruct.pack_length": (1, None), "instruct.drop_name": (0, 1), "instruct.drop_taxon": (0, 1),
    "instruct.main_weight": (0, None), "instruct.connector_lr": (0, None),
    "model.esm_lora.r": (0, None), "model.llm_lora.r": (0, None), "model.esm_lora.dropout": (0, 1),
    "model.llm_lora.dropout": (0, 1), "model.projector.dropout": (0, 1),
    "align.text_layer": (1, None), "align.temperature": (0, None),
    "warmup.dim": (1, None), "warmup.temperature": (0, None),
}


def check_ranges(cfg) -> None:
    for key, (low, high) in RANGES.items():
        section, _, name = key.rpartition(".")
        obj = cfg
        for p in section.split("."):
            obj = getattr(obj, p)
        v = getattr(obj, name)
        if v is None:
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            what = (f"from {low} to {high}" if low is not None and high is not None else f"at least {low}")
            raise ConfigError(f"{key}={v}: {what}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {_renamed(where + k, values).rpartition(".")[2]: v for k, v in values.items()}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        t = hints[name]
        kwargs[name] = _build(t, value, f"{where}{name}.") if dataclasses.is_dataclass(t) else \
            typed(value, t, where + name)
    return cls(**kwargs)


def _set(obj, dotted: str, raw: str) -> None:
    dotted = _renamed(dotted)
    *path, last = dotted.split(".")
    for p in path:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ConfigError(f"override {dotted}: no section {p!r}")
        obj = getattr(obj, p)
    if not hasattr(obj, last):
        valid = [f.name for f in dataclasses.fields(obj)]
        raise ConfigError(f"override {dotted}: no key {last!r} (valid: {valid})")
    value = yaml.safe_load(raw) if raw != "" else None
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):       # a whole section (model.resampler={latents: 64, ...}): its keys
        value = _build(type(current), value, f"{dotted}.")   # checked, the rest at their defaults, as in YAML
    else:
        value = typed(value, typing.get_type_hints(type(obj))[last], dotted)
    setattr(obj, last, value)


def load_config(path: Optional[str], overrides: List[str] = ()) -> Config:
    values: Any = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    return config_from_dict(values, overrides)


def config_from_dict(values: dict, overrides: List[str] = ()) -> Config:
    """A Config from nested values (a YAML's, or the `config` a run saved in megatron_p2t.json) + overrides."""
    cfg = _build(Config, values, "")
    for o in overrides:
        key, eq, raw = o.partition("=")
        if not eq:
            raise ConfigError(f"override {o!r}: expected section.key=value")
        _set(cfg, key.lstrip("-"), raw)
    check_ranges(cfg)
    try:
        parts.import_parts(cfg.imports)
        parts.check(cfg.model, cfg.parallel)
        enc, con, _ = parts.of(cfg.model)
        parts.align_objective(cfg.align.objective, cfg.model)
        if cfg.model.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"model.attention_kernel={cfg.model.attention_kernel!r}: choose one of "
                             + "; ".join(f"{k} ({v})" for k, v in ATTENTION_KERNELS.items()))
        check_recompute(cfg.model.recompute)
        for key in ("esm_lora", "llm_lora"):
            bad = set(getattr(cfg.model, key).modules_to_save) - set(SAVABLE)
            if bad or (key == "esm_lora" and getattr(cfg.model, key).modules_to_save):
                raise ValueError(f"model.{key}.modules_to_save={getattr(cfg.model, key).modules_to_save}: the "
                                 f"decoder's {' and '.join(SAVABLE)} can be trained fully beside its adapters")
        if not enc.reads_protein and cfg.instruct.template != "plain":
            raise ValueError(f"model.encoder={enc.name} (decoder-only) prompts with text alone: set "
                             f"instruct.template=plain")
        if cfg.model.p2tv2 and not con.p2tv2:
            raise ValueError(f"model.p2tv2={cfg.model.p2tv2} is a Prot2Text-V2 release, whose connector is its "
                             f"projector (model.connector=mlp), not model.connector={cfg.model.connector}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if enc.structure:
        cfg.data.structure = True     # the loader then reads each sample's coordinates beside its sequence
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def recipe(cfg: Config) -> dict:
    """What a checkpoint's tensors depend on beyond their shapes (the parts and the settings they name)."""
    return parts.recipe_keys(cfg.model)


def saved_run(path: str) -> Optional[dict]:
    """The megatron_p2t.json a run, an import or an export directory keeps beside a checkpoint (RunDir.saved_info)."""
    from megatron_p2t.checkpoint.run_dir import RunDir   # torch: the commands that read checkpoints load it anyway
    return RunDir.saved_info(path)


def check_same_recipe(path: str, cfg: Config, option: str) -> None:
    """Refuse, before anything is built, a checkpoint written by another recipe than `cfg` (Prot2Text-V2's
    projector into a resampler model, another ESM layer, ...): its tensors would not fit, or fit and mean
    something else. `option` names where the path came from (--resume, instruct.init_from)."""
    saved = saved_run(path)
    if saved is None or "config" not in saved:
        return
    their_cfg = config_from_dict(saved["config"])
    theirs, ours = recipe(their_cfg), recipe(cfg)
    diff = [k for k in ours if theirs.get(k) != ours[k]]
    if saved.get("stage") in ("align", "align-feature") and parts.decoder(their_cfg.model.decoder).moe(
            their_cfg.model) is None:
        # a stage 1 that kept the dense decoder frozen holds none of it: an MoE stage 2 upcycles model.llama
        diff = [k for k in diff if not k.startswith(("model.decoder", "model.moe."))]
    if diff:
        raise ConfigError(f"{option}={path}: written by a run of another recipe -- "
                          + ", ".join(f"{k}={theirs.get(k)} there, {ours[k]} here" for k in diff)
                          + "; set those options as the run had them to continue it, or start this recipe from "
                            "its own stage 1 (or fresh)")
