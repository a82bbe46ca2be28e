"""`megatron-p2t export`: a stage-2 checkpoint (any tensor x pipeline layout) -> one directory that
`megatron_p2t.hf_model.Prot2TextForGeneration.from_pretrained` (transformers + torch) loads:

  llama/      LlamaForCausalLM with the LoRA adapters merged
  adapter/    the same adapters unmerged, in PEFT's layout (adapter_config.json + adapter_model.safetensors),
              for the original LLaMA checkpoint
  esm/        EsmModel (with stage 1's ESM LoRA merged when it had one)
  projector/  fc1/fc2 + config.json (Prot2Text-V2's projector, model.connector=mlp), or
  connector/  the resampler and mlp2x_gelu in Protein2Text's released names + config.json (hf/connector.py)
  tokenizer/  the run's tokenizer, chat template included
  megatron_p2t.json, README.md

Runs with one process per model-parallel shard of the checkpoint (`main` launches them when needed); each
rank reads only its own shard of the DeepSpeed checkpoint. `--format p2tv2` writes Prot2Text-V2's own layout
instead, from a trained run or from an `import-p2tv2` checkpoint (at whatever layout this was launched with).
The layouts' conversions are checkpoint/'s; this module runs them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_p2t import parts
from megatron_p2t.checkpoint import export_hf, llama_hf, p2t_hf, p2tv2, sharded
from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.checkpoint.run_dir import RunDir, load_file, verify_checksums
from megatron_p2t.config import ConfigError, check_same_recipe, config_from_dict
from megatron_p2t.data.text_tokenizer import load_text_tokenizer
from megatron_p2t.inference.model import Prot2TextForGeneration
from megatron_p2t.models.llama_moe import is_expert_param
from megatron_p2t.models.lora import apply_lora, merge_lora
from megatron_p2t.parallel import launch_env, pipeline, state
from megatron_p2t.parallel.layout import Layout, ParallelConfig
from megatron_p2t.parallel.state import collective_device
from megatron_p2t.parts import assemble
from megatron_p2t.parts.assemble import moe_of
from megatron_p2t.training import experts, joined


def resolve(checkpoint: str):
    """(step directory, run directory) of a stage-2 run directory or one of its step directories."""
    step = RunDir.step(checkpoint, "the trained run in --checkpoint (`instruct`, or `pretrain-lm`)")
    run_dir = os.path.dirname(step.rstrip("/"))
    if RunDir.saved_info(run_dir) is None:
        raise CheckpointError(f"{run_dir}: no megatron_p2t.json (the run's config); is this an `instruct` run?")
    return step, run_dir


def checkpoint_layout(step: str, pp: int, ep: int = 1) -> ParallelConfig:
    """The layout a checkpoint with one mp_rank_* file per model-parallel rank was written at, by a run at
    pipeline size `pp` and expert-parallel size `ep` (its config says)."""
    n = len(RunDir.model_files(step))
    if not n:
        raise CheckpointError(f"{step}: no mp_rank_*_model_states.pt files")
    if n % pp:
        raise CheckpointError(f"{step}: {n} model-parallel shards, which the run's parallel.pipeline={pp} does not "
                              f"divide; is megatron_p2t.json beside it from another run?")
    return ParallelConfig(tensor=n // pp, pipeline=pp, expert=ep)


def main(checkpoint: str, out: str, fmt: str = "megatron_p2t", verify_logits: bool = False,
         overrides=(), argv=None) -> dict | None:
    """The export command: a trained run's checkpoint (launching one process per model-parallel shard when not
    under a launcher), or an `import-p2tv2` checkpoint back to the published layout. The report on rank 0."""
    if fmt == "p2tv2" and RunDir.is_import(checkpoint):  # an import: any layout
        if verify_logits:
            raise ConfigError("--verify compares a trained run with its export; an import's export is checked "
                              "bit for bit instead (tests/checkpoint/test_p2tv2.py)")
        return export_imported(checkpoint, out, overrides)
    step, run_dir = resolve(checkpoint)
    info = RunDir.saved_info(run_dir)
    if info.get("stage") == "align":
        raise CheckpointError(f"{run_dir}: an H-SCALE stage-1 run (`align`) trains Prot2Text-V2's projector alone; "
                              f"export the stage-2 run that continues it (instruct.init_from={run_dir})")
    saved = info["config"]
    parallel = checkpoint_layout(step, int(saved.get("parallel", {}).get("pipeline", 1)),
                                 int(saved.get("parallel", {}).get("expert", 1)))
    shards = parallel.tensor * parallel.pipeline * parallel.expert   # expert-parallel ranks: their own experts
    if not launch_env.under_launcher() and shards > 1:  # one process per model-parallel shard of the checkpoint
        rc = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={shards}", "-m", "megatron_p2t", *(argv or sys.argv[1:])])
        if rc:
            raise SystemExit(rc)
        return None
    launch_env.discover()
    if int(os.environ["WORLD_SIZE"]) != shards:
        raise ValueError(f"{step} has {shards} model-parallel shards (tensor {parallel.tensor} x pipeline "
                         f"{parallel.pipeline} x expert {parallel.expert}); export with {shards} processes (or run "
                         f"it without a launcher and it starts them)")
    cfg = config_from_dict(saved, [*overrides, f"parallel.tensor={parallel.tensor}",
                                   f"parallel.pipeline={parallel.pipeline}", f"parallel.expert={parallel.expert}"])
    check_same_recipe(step, cfg, "--checkpoint")     # an override of the parts would misread its tensors
    if moe_of(cfg.model) is not None and fmt == "p2tv2":
        raise ConfigError(f"{step}: --format p2tv2 is Prot2Text-V2's layout, whose decoder is a dense LLaMA; a "
                          f"model.decoder=llama_moe run exports in the default format (llama/ in Qwen2-MoE's layout)")
    if not parts.connector(cfg.model.connector).p2tv2 and fmt == "p2tv2":
        raise ConfigError(f"{step}: --format p2tv2 is Prot2Text-V2's layout, which holds its projector only; a "
                          f"model.connector={cfg.model.connector} run exports in the default format (connector/ "
                          f"in the released Protein2Text names)")
    documents = info.get("stage") == "pretrain-lm"       # its valid split is documents, not prompts
    layout = state.initialize(cfg.parallel)
    res = export(cfg, step, out, layout, fmt=fmt, documents=documents)
    merged = torch.tensor([res["merged_lora_layers"]])  # each stage merged its own layers
    if layout.pp > 1:
        merged = merged.to(collective_device())
        dist.all_reduce(merged, group=layout.pp_group)
    report = {"out": out, "tensor_parallel": layout.tp, "pipeline_parallel": layout.pp,
              "merged_lora_layers": int(merged)}
    if verify_logits:
        report["max_abs_logit_diff"], report["max_abs_logit"] = verify(res["model"], cfg, out, layout,
                                                                       documents=documents)
        degenerate(report["max_abs_logit"], out)
    state.destroy()
    return report


def degenerate(max_abs_logit: float, out: str) -> None:
    """--verify compares the export with the megatron model; both can agree on nothing useful. Logits that are
    all zero (or not finite) mean weights that are zero or lost, which agreement does not reveal."""
    if not math.isfinite(max_abs_logit) or max_abs_logit == 0.0:
        raise CheckpointError(f"{out}: the exported model's logits on the validation prompts are all "
                              f"{max_abs_logit} (the largest |logit|): its weights are zero or lost; the checkpoint "
                              f"or its export is broken, so it was not verified")


def export(cfg, step: str, out: str, layout: Layout, fmt: str = "megatron_p2t", documents: bool = False) -> dict:
    """Collective over the checkpoint's model-parallel ranks. fmt "p2tv2": Prot2Text-V2's own layout instead.
    A decoder-only run (model.encoder=none) writes llama/, adapter/ (with its modules_to_save), tokenizer/."""
    tp, tpr = layout.tp, layout.tp_rank
    if not RunDir.is_import(cfg.instruct.init_from):
        # the projector comes from the checkpoint; an import-p2tv2 base stays
        cfg = dataclasses.replace(cfg, instruct=dataclasses.replace(cfg.instruct, init_from=None))
    model, llama_cfg, esm_cfg, pcfg = joined.build(cfg, layout)
    cfg = joined.stage2_config(cfg)
    esm_lora = model.pre_process and model.reads_protein and cfg.model.esm_lora.r > 0 and _has_esm_lora(step)
    if esm_lora:
        apply_lora(model.esm, cfg.model.esm_lora, "esm")
    mine = RunDir.model_file(step, layout.mp_rank)       # DeepSpeed names the files by model-parallel rank
    verify_checksums(step, [os.path.basename(mine)])
    state_dict = load_file(mine)["module"]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    moe = moe_of(cfg.model)
    # checkpoints hold only the trained tensors; under expert parallelism the experts are in their own files
    split = {n for n, p in model.named_parameters() if is_expert_param(p)} if moe is not None and layout.ep > 1 \
        else set()
    trained = {n for n, p in model.named_parameters() if p.requires_grad} - split
    missing = [k for k in missing if k in trained]
    if missing or unexpected:
        raise CheckpointError(f"{step}: the checkpoint does not fit the configured model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    if split:    # (checkpoints written before they left the module file held the first data-parallel rank's too)
        experts.load_weights({n: p for n, p in model.named_parameters() if n in split}, step, layout)
    if fmt == "p2tv2":
        merged = merge_lora(model.llm) + (merge_lora(model.esm) if model.pre_process else 0)
        src = cfg.model.p2tv2
        # continued from the published checkpoint: its unused tensors, names and dtypes; else what the authors'
        # EsmModel holds beside our encoder's weights, from the ESM checkpoint the run started from
        extra = p2tv2.carried(src) if src else p2tv2.esm_extras(cfg.model.encoder_path, esm_cfg)
        pid = assemble.placeholder_id(cfg.model, cfg.data.text_tokenizer)
        p2tv2.write(model, out, llama_cfg, esm_cfg, pcfg, pid, tpr, tp, extra,
                    cfg.data.text_tokenizer or "", source_config=os.path.join(src, "config.json") if src else "",
                    source=p2tv2.source_layout(src) if src else None)
        return {"out": out, "merged_lora_layers": merged, "model": model}
    adapter_dir = os.path.join(out, "adapter")
    # r=0: a feature-alignment run, the decoder as it came. An MoE decoder's adapters sit beside experts that no
    # base checkpoint has, so it is exported merged only
    lora = cfg.model.llm_lora.r > 0 and moe is None
    lc = cfg.model.llm_lora
    if lora:
        slices = llama_hf.lora_hf_slices(model.llm, llama_cfg, tpr, tp)
        slices += llama_hf.saved_module_slices(model.llm, llama_cfg, lc.modules_to_save, tpr, tp)
        export_hf.export({adapter_dir: slices}, out)
    merged = merge_lora(model.llm) + (merge_lora(model.esm) if model.pre_process and model.reads_protein else 0)
    p2t_hf.hf_export(model, out, llama_cfg, esm_cfg, pcfg, tpr, tp, cfg.model.resampler, moe=moe,
                     ep_rank=layout.ep_rank, esm_src=cfg.model.p2tv2 or cfg.model.encoder_path)
    if dist.get_rank() == 0:
        if lora:
            llama_hf.finish_peft_adapter(adapter_dir, lc, cfg.model.llama)
        load_text_tokenizer(cfg.data.text_tokenizer, cfg.data.text_end).save_pretrained(os.path.join(out,
                                                                                                      "tokenizer"))
        info = {"format": "megatron_p2t.export/1", "system_prompt": cfg.instruct.system_prompt,
                "missing_fields": cfg.instruct.missing_fields, "connector": cfg.model.connector,
                "max_protein_residues": cfg.data.max_protein_residues, "checkpoint": os.path.abspath(step),
                "lora_merged_layers": merged, "text_end": cfg.data.text_end, "template": cfg.instruct.template}
        if model.reads_protein:
            info.update({"placeholder_token": cfg.model.placeholder_token,
                         "esm_output_layer": cfg.model.esm_output_layer,
                         # False: esm/ holds the layers up to the one read, whose output is taken before any norm
                         "esm_final_norm": cfg.model.esm_output_layer % (esm_cfg.num_hidden_layers + 1)
                         == esm_cfg.num_hidden_layers})
        else:
            info["decoder_only"] = True
        info.update(model.connector_spec.info(cfg.model))   # what its inference form is rebuilt with
        if model.encoder_spec.structure:
            info["encoder"] = cfg.model.encoder     # structure/ beside esm/ (hf/structure.py)
        if moe is not None:
            info["decoder"] = cfg.model.decoder     # llama/ holds a Qwen2MoeForCausalLM (checkpoint/llama_moe_hf.py)
        if cfg.imports:
            info["imports"] = cfg.imports           # the modules that register its parts, for `generate`
        with open(os.path.join(out, "megatron_p2t.json"), "w") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(_model_card(cfg, step, lc) if model.reads_protein else _lm_card(cfg, step, lc, documents))
    dist.barrier()
    return {"out": out, "merged_lora_layers": merged, "model": model}


def export_imported(checkpoint: str, out: str, overrides=()) -> dict:
    """An `import-p2tv2` checkpoint back to the published layout, at the tensor-parallel size this process was
    launched with (a sharded checkpoint reloads at any layout)."""
    launch_env.discover()
    cfg = config_from_dict(RunDir.saved_info(checkpoint)["config"], [f"parallel.tensor={os.environ['WORLD_SIZE']}",
                                                                     "parallel.pipeline=1", *overrides])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, p2tv2=checkpoint))  # the shapes
    layout = state.initialize(cfg.parallel)
    model, llama_cfg, esm_cfg, pcfg = assemble.build_model(cfg.model, cfg.data, layout)
    sharded.load(model, checkpoint)
    pid = assemble.placeholder_id(cfg.model, cfg.data.text_tokenizer)
    p2tv2.write(model, out, llama_cfg, esm_cfg, pcfg, pid, layout.tp_rank, layout.tp,
                p2tv2.carried(checkpoint), cfg.data.text_tokenizer or "",
                source_config=os.path.join(checkpoint, "config.json"), source=p2tv2.source_layout(checkpoint))
    state.destroy()
    return {"out": out, "format": "p2tv2"}


def _has_esm_lora(step: str) -> bool:
    sd = load_file(RunDir.model_files(step)[0])["module"]
    return any(k.startswith("esm.") and ".lora_" in k for k in sd)


def _model_card(cfg, step: str, lc) -> str:
    tuned = (f"LoRA r={lc.r}, alpha={lc.alpha or 2 * lc.r} on {', '.join(lc.targets)}; merged in `llama/`, "
             f"unmerged in `adapter/` (PEFT)" if lc.r > 0 else "the connector alone (feature alignment; the decoder "
             "as it came)")
    return f"""# Prot2Text-style protein-to-text model (megatron_p2t export)

ESM-2 encoder -> {parts.connector(cfg.model.connector).card or cfg.model.connector} -> LLaMA decoder.
The decoder writes a protein's function from its sequence (and, when given, its name and taxon).

- ESM: `{cfg.model.encoder_path}` (layer {cfg.model.esm_output_layer}); LLaMA: `{cfg.model.llama}`
- trained: {tuned}
- exported from `{os.path.abspath(step)}`

```python
from megatron_p2t.hf_model import Prot2TextForGeneration
m = Prot2TextForGeneration.from_pretrained("<this directory>")
print(m.generate(["MKTAYIAKQRQISFVKSHFSRQ"], num_beams=4))
```
Evaluate with `megatron-p2t generate` and `megatron-p2t evaluate`, which also scores the MMseqs2
nearest-neighbour baseline on the same split.
"""


def _lm_card(cfg, step: str, lc, documents: bool) -> str:
    stage = ("stage 1: continual pretraining on proteins as text" if documents else
             "stage 2: instruction tuning on Alpaca rows (`instruction input` -> output)")
    return f"""# Protein language model (ProLLaMA-style, megatron_p2t export)

A LLaMA decoder that reads and writes proteins as text (`Seq=<MKV...>`); {stage}.

- base: `{cfg.model.llama}`; LoRA r={lc.r}, alpha={lc.alpha or 2 * lc.r} on {', '.join(lc.targets)}
  {'and ' + ', '.join(lc.modules_to_save) + ' trained fully; ' if lc.modules_to_save else ''}merged in `llama/`,
  unmerged in `adapter/` (PEFT)
- exported from `{os.path.abspath(step)}`

```python
from transformers import AutoTokenizer, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained("<this directory>/tokenizer")
lm = LlamaForCausalLM.from_pretrained("<this directory>/llama")
ids = tok("[Generate by superfamily] Superfamily=<Globin-like superfamily>", return_tensors="pt").input_ids
print(tok.decode(lm.generate(ids, do_sample=True, top_p=0.9, temperature=0.8, max_new_tokens=400)[0]))
```
Or `megatron-p2t generate-protein --model <this directory>` (sampling, checked sequences, resumable).
"""


def verify(model, cfg, out: str, layout: Layout, max_batches: int = 1, documents: bool = False):
    """Collective: the megatron model (LoRA merged) and the exported directory loaded by transformers score the
    same validation prompts (documents, for a decoder-only stage 1); returns the largest |logit difference| over
    real tokens and the largest |logit| among them, its scale (rank 0's figures)."""
    cfg = dataclasses.replace(cfg, instruct=dataclasses.replace(cfg.instruct, pack=False))
    model.eval()
    batches = []
    for b in joined.make_loader(cfg, layout, "valid", train=False, documents=documents):
        if b is not None:
            batches.append(b)
        if len(batches) == max_batches:
            break
    ours = []
    with torch.no_grad():
        for b in batches:
            for logits in pipeline.run(model, [b], collect_outputs=True):  # on the last stage only
                ours.append(gather_from_tensor_model_parallel_region(logits).float().cpu())
    # the last stage's first tensor-parallel rank compares (it holds the whole logits); rank 0 is on its pipeline
    src = torch.tensor([layout.pp_last_rank], device=collective_device())
    dist.broadcast(src, 0)
    src = int(src)
    worst = torch.zeros(2)                                  # the largest |difference|, the largest |logit|
    if dist.get_rank() == src:
        if model.reads_protein:
            hf = Prot2TextForGeneration.from_pretrained(out)
            score = lambda b: hf(b["input_ids"], b["protein_ids"], b["protein_mask"], coords=b.get("protein_coords"),
                                 known=b.get("coords_mask"))
        else:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llama")).eval()
            score = lambda b: hf(input_ids=b["input_ids"]).logits
        with torch.no_grad():
            for b, mine in zip(batches, ours):
                theirs = score(b).float()
                for i, n in enumerate(b["lengths"].tolist()):  # right-padded rows: their real tokens
                    worst = torch.maximum(worst, torch.stack([(theirs[i, :n] - mine[i, :n]).abs().max(),
                                                              mine[i, :n].abs().max()]))
    worst = worst.to(collective_device())
    dist.broadcast(worst, src)
    return float(worst[0]), float(worst[1])
