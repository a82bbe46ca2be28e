"""Checkpoint commands: HF directories and Prot2Text-V2 releases in, HF directories and releases out."""
from __future__ import annotations

import json
import os
import sys

from megatron_p2t.cli.table import OVERRIDES, arg, command, model_setup, torch_rank


@command("import-hf", "HF ESM + LLaMA directories -> a megatron checkpoint (run under torchrun/deepspeed with tensor x "
                      "pipeline x data processes)", arg("--config", required=True), arg("--out", required=True),
         OVERRIDES)
def cmd_import_hf(args) -> int:
    """HF ESM + LLaMA (+ projector) directories -> a megatron checkpoint at the configured TP x PP layout."""
    from megatron_p2t.checkpoint import sharded
    from megatron_p2t.checkpoint.run_dir import RunDir
    from megatron_p2t.parts import assemble
    cfg, layout = model_setup(args)
    model, llama_cfg, _, pcfg = assemble.build_model(cfg.model, cfg.data, layout)
    assemble.load_hf(model, cfg.model, llama_cfg, pcfg, layout)
    sharded.save(model, args.out)
    RunDir(args.out).write_info(cfg, "import")
    if torch_rank() == 0:
        print(f"megatron checkpoint ({layout.tp} x {layout.pp}, reloadable at any layout) -> {args.out}")
    return 0


@command("import-p2tv2", "a published Prot2Text-V2 directory -> a megatron checkpoint (run under torchrun/deepspeed "
                         "with tensor x pipeline processes)",
         arg("--out", required=True),
         arg("--config", default=None, help="a run config for the layout and dtype (default: built-in)"),
         arg("inputs", nargs="+", metavar="SOURCE [section.key=value ...]",
             help="the Prot2Text-V2 directory (config.json esm2llama_instruct + safetensors), then overrides such as "
                  "parallel.tensor=2 model.dtype=bfloat16"))
def cmd_import_p2tv2(args) -> int:
    """Prot2Text-V2's layout -> a megatron checkpoint (each rank reads only its slice), reloadable at any layout,
    for `instruct` (instruct.init_from=OUT) or `export --format p2tv2`."""
    from megatron_p2t.checkpoint import p2tv2
    from megatron_p2t.parts import assemble
    args.source, *overrides = args.inputs
    args.overrides = [*overrides, f"model.p2tv2={os.path.abspath(args.source)}"]
    p2tv2.read_config(args.source)  # a wrong directory fails here, before any process group exists
    cfg, layout = model_setup(args)
    model, llama_cfg, _, pcfg = assemble.build_model(cfg.model, cfg.data, layout)
    assemble.load_hf(model, cfg.model, llama_cfg, pcfg, layout)
    p2tv2.save_imported(model, cfg, args.source, args.out)
    if torch_rank() == 0:
        print(f"megatron checkpoint of {args.source} ({layout.tp} x {layout.pp}, reloadable at any layout) -> "
              f"{args.out}")
    return 0


@command("export-hf", "a megatron checkpoint from any layout -> HF directories", arg("--config", required=True),
         arg("--out", required=True), arg("--checkpoint", required=True), OVERRIDES)
def cmd_export_hf(args) -> int:
    """A megatron checkpoint (any layout) -> HF directories llama/, esm/, projector/ under --out."""
    from megatron_p2t.checkpoint import p2t_hf, sharded
    from megatron_p2t.parts import assemble
    cfg, layout = model_setup(args)
    model, llama_cfg, esm_cfg, pcfg = assemble.build_model(cfg.model, cfg.data, layout)
    sharded.load(model, args.checkpoint)
    p2t_hf.hf_export(model, args.out, llama_cfg, esm_cfg, pcfg, layout.tp_rank, layout.tp,
                     esm_src=cfg.model.p2tv2 or cfg.model.encoder_path)
    if torch_rank() == 0:
        print(f"HF directories llama/, esm/, projector/ -> {args.out}")
    return 0


@command("export", "a stage-2 checkpoint (any TP) -> one HF directory: merged LLaMA, PEFT adapter, ESM, connector, "
                   "tokenizer, model card",
         arg("--checkpoint", required=True, help="an `instruct` run directory (its latest) or a step directory"),
         arg("--out", required=True),
         arg("--verify", action="store_true", help="load the export with transformers and compare its logits with the "
                                                   "megatron model's on validation prompts"),
         arg("--format", choices=["megatron_p2t", "p2tv2"], default="megatron_p2t",
             help="p2tv2: Prot2Text-V2's own layout (Esm2LlamaInstructForCausalLM), from an `instruct` run or an "
                  "`import-p2tv2` checkpoint"),
         arg("overrides", nargs="*", help="section.key=value over the run's saved config"))
def cmd_export(args) -> int:
    """A stage-2 checkpoint -> one HF-format directory (merged LLaMA, PEFT adapter, ESM, projector, tokenizer)."""
    from megatron_p2t import export
    report = export.main(args.checkpoint, args.out, fmt=args.format, verify_logits=args.verify,
                         overrides=args.overrides, argv=sys.argv[1:])
    if report is not None and torch_rank() == 0:
        print(json.dumps(report))
    return 0
