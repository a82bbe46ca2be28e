"""`megatron-p2t export`: a stage-2 checkpoint (any tensor x pipeline layout) -> one directory that
`megatron_p2t.hf_model.Prot2TextForGeneration.from_pretrained` (transformers + torch) loads:

  llama/      LlamaForCausalLM with the LoRA adapters merged
  adapter/    the same adapters unmerged, in PEFT's layout (adapter_config.json + adapter_model.safetensors),
              for the original LLaMA checkpoint
  esm/        EsmModel (with stage 1's ESM LoRA merged when it had one)
  projector/  fc1/fc2 + config.json
  tokenizer/  the run's tokenizer, chat template included
  megatron_p2t.json, README.md

Runs with one process per model-parallel shard of the checkpoint (the CLI launches them when needed); each
rank reads only its own shard of the DeepSpeed checkpoint.
"""
from __future__ import annotations

import glob
import json
import os

import torch
import torch.distributed as dist

from megatron_p2t.checkpoint.hf_dir import CheckpointError


def resolve(checkpoint: str):
    """(step directory, run directory) of a stage-2 run directory or one of its step directories."""
    from megatron_p2t.training.run_instruct import stage1_dir
    step = stage1_dir(checkpoint)
    run_dir = os.path.dirname(step.rstrip("/"))
    if not os.path.exists(os.path.join(run_dir, "megatron_p2t.json")):
        raise CheckpointError(f"{run_dir}: no megatron_p2t.json (the run's config); is this an `instruct` run?")
    return step, run_dir


def checkpoint_layout(step: str, pp: int):
    """(tensor, pipeline) sizes of a checkpoint with one mp_rank_* file per model-parallel rank, written by a run
    at pipeline size `pp` (its config says)."""
    n = len(glob.glob(os.path.join(step, "mp_rank_*_model_states.pt")))
    if not n:
        raise CheckpointError(f"{step}: no mp_rank_*_model_states.pt files")
    if n % pp:
        raise CheckpointError(f"{step}: {n} model-parallel shards, which the run's parallel.pipeline={pp} does not "
                              f"divide; is megatron_p2t.json beside it from another run?")
    return n // pp, pp


def export(cfg, step: str, out: str, fmt: str = "megatron_p2t") -> dict:
    """Collective over the checkpoint's tensor-parallel ranks. fmt "p2tv2": Prot2Text-V2's own layout instead."""
    from megatron.core import parallel_state as ps

    from megatron_p2t.checkpoint import export_hf, llama_hf
    from megatron_p2t.models import p2t
    from megatron_p2t.models.lora import apply_lora, merge_lora
    from megatron_p2t.training import run_instruct
    tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if not os.path.exists(os.path.join(cfg.instruct.init_from or "", "metadata.json")):
        cfg.instruct.init_from = None  # the projector comes from the checkpoint; an import-p2tv2 base stays
    model, llama_cfg, esm_cfg, pcfg = run_instruct.build(cfg)
    esm_lora = model.pre_process and cfg.model.esm_lora.r > 0 and _has_esm_lora(step)
    if esm_lora:
        apply_lora(model.esm, cfg.model.esm_lora, "esm")
    mp_rank = dist.get_rank(ps.get_model_parallel_group())  # how DeepSpeed named the file (trainer.MegatronMPU)
    state = torch.load(os.path.join(step, f"mp_rank_{mp_rank:02d}_model_states.pt"), map_location="cpu",
                       weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # checkpoints hold only these
    missing = [k for k in missing if k in trained]
    if missing or unexpected:
        raise CheckpointError(f"{step}: the checkpoint does not fit the configured model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    if fmt == "p2tv2":
        from megatron_p2t.checkpoint import p2tv2
        from megatron_p2t.models.build import placeholder_id
        merged = merge_lora(model.llm) + (merge_lora(model.esm) if model.pre_process else 0)
        src = cfg.model.p2tv2
        p2tv2.write(model, out, llama_cfg, esm_cfg, pcfg, placeholder_id(cfg), tpr, tp,
                    p2tv2.carried(src) if src else {}, cfg.data.text_tokenizer or "",
                    source_config=os.path.join(src, "config.json") if src else "")
        return {"out": out, "merged_lora_layers": merged, "model": model}
    adapter_dir = os.path.join(out, "adapter")
    export_hf.export({adapter_dir: llama_hf.lora_hf_slices(model.llm, llama_cfg, tpr, tp)}, out)
    merged = merge_lora(model.llm) + (merge_lora(model.esm) if model.pre_process else 0)
    p2t.hf_export(model, out, llama_cfg, esm_cfg, pcfg, tpr, tp)
    if dist.get_rank() == 0:
        os.replace(os.path.join(adapter_dir, "model.safetensors"),  # PEFT's file name
                   os.path.join(adapter_dir, "adapter_model.safetensors"))
        lc = cfg.model.llm_lora
        targets = sorted({h.split(".")[-1] for t in lc.targets for h in llama_hf.LORA_TARGETS[t]})
        with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.model.llama,
                       "r": lc.r, "lora_alpha": lc.alpha or 2 * lc.r, "lora_dropout": lc.dropout,
                       "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
                       "inference_mode": True}, f, indent=1)
        from megatron_p2t.data.text_tokenizer import load_text_tokenizer
        load_text_tokenizer(cfg.data.text_tokenizer).save_pretrained(os.path.join(out, "tokenizer"))
        info = {"format": "megatron_p2t.export/1", "placeholder_token": cfg.model.placeholder_token,
                "system_prompt": cfg.instruct.system_prompt, "esm_output_layer": cfg.model.esm_output_layer,
                "max_protein_residues": cfg.data.max_protein_residues, "checkpoint": os.path.abspath(step),
                "lora_merged_layers": merged}
        with open(os.path.join(out, "megatron_p2t.json"), "w") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(_model_card(cfg, step, lc))
    dist.barrier()
    return {"out": out, "merged_lora_layers": merged, "model": model}


def _has_esm_lora(step: str) -> bool:
    state = torch.load(sorted(glob.glob(os.path.join(step, "mp_rank_*_model_states.pt")))[0], map_location="cpu",
                       weights_only=False)["module"]
    return any(k.startswith("esm.") and ".lora_" in k for k in state)


def _model_card(cfg, step: str, lc) -> str:
    return f"""# Prot2Text-style protein-to-text model (megatron_p2t export)

ESM-2 encoder -> nonlinear projector -> LLaMA decoder. The decoder writes a protein's function from its
sequence (and, when given, its name and taxon).

- ESM: `{cfg.model.esm}` (layer {cfg.model.esm_output_layer}); LLaMA: `{cfg.model.llama}`
- stage 2: LoRA r={lc.r}, alpha={lc.alpha or 2 * lc.r} on {', '.join(lc.targets)}; merged in `llama/`,
  unmerged in `adapter/` (PEFT)
- exported from `{os.path.abspath(step)}`

```python
from megatron_p2t.hf_model import Prot2TextForGeneration
m = Prot2TextForGeneration.from_pretrained("<this directory>")
print(m.generate(["MKTAYIAKQRQISFVKSHFSRQ"], num_beams=4))
```
Evaluate with `megatron-p2t generate` and `megatron-p2t evaluate`, which also scores the MMseqs2
nearest-neighbour baseline on the same split.
"""


def verify(model, cfg, out: str, max_batches: int = 1) -> float:
    """Collective: the megatron model (LoRA merged) and the exported directory loaded by transformers score the
    same validation prompts; returns the largest |logit difference| over real tokens (rank 0's figure)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_p2t.parallel import pipeline
    from megatron_p2t.parallel.state import collective_device
    from megatron_p2t.training.run_instruct import make_loader
    cfg.instruct.pack = False
    model.eval()
    batches = []
    for b in make_loader(cfg, "valid", train=False):
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
    src = torch.tensor([ps.get_pipeline_model_parallel_last_rank()], device=collective_device())
    dist.broadcast(src, 0)
    src = int(src)
    diff = torch.zeros(1)
    if dist.get_rank() == src:
        from megatron_p2t.hf_model import Prot2TextForGeneration
        hf = Prot2TextForGeneration.from_pretrained(out)
        with torch.no_grad():
            for b, mine in zip(batches, ours):
                theirs = hf(b["input_ids"], b["protein_ids"], b["protein_mask"]).float()
                for i, n in enumerate(b["lengths"].tolist()):  # right-padded rows: their real tokens
                    diff = torch.maximum(diff, (theirs[i, :n] - mine[i, :n]).abs().max().reshape(1))
    diff = diff.to(collective_device())
    dist.broadcast(diff, src)
    return float(diff)
