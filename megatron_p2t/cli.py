"""megatron-p2t: one entry point, a subcommand per stage. Launch scripts in launch/ only wrap it.

Each command imports what it needs when it runs, so `--help`, the data and planning commands start without
torch, megatron-core and DeepSpeed (several seconds of imports); the library modules import at their tops."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SAMPLE = os.path.join(REPO, "..", "shared", "data", "swissprot_sample.dat.gz")


def _texts_from_manifest(manifest: str, split: str = "train"):
    from megatron_p2t.data.shards import split_samples
    for s in split_samples(manifest, split):
        yield s["txt"].decode()


def cmd_make_tokenizer(args) -> int:
    from megatron_p2t.data.text_tokenizer import build_llama3_style_tokenizer
    tok = build_llama3_style_tokenizer(_texts_from_manifest(args.manifest), args.out, args.vocab_size)
    print(f"tokenizer with {len(tok):,} tokens (LLaMA-3.1 special-token layout, chat template) -> {args.out}")
    return 0


def data_check(cfg, max_batches: int | None = None) -> dict:
    from megatron_p2t.data.loader import ProteinTextLoader
    loader = ProteinTextLoader(cfg.data)
    t0 = time.perf_counter()
    n = 0
    for _ in loader:
        n += 1
        if max_batches and n >= max_batches:
            break
    secs = time.perf_counter() - t0
    return {"rank": loader.dp_rank, "dp_size": loader.dp_size, "batches": n, "samples": loader.stats["samples"],
            "samples_per_s": round(loader.stats["samples"] / secs, 1), "padding_fraction":
            round(loader.padding_fraction(), 4), "seconds": round(secs, 2)}


def cmd_data_check(args) -> int:
    from megatron_p2t.config import load_config
    cfg = load_config(args.config, args.overrides)
    if cfg.data.epochs is None and not args.max_batches:
        # a check makes one pass unless told to stop earlier
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, epochs=1))
        if cfg.data.batch_size is None:
            print("error: the token-budget stream is endless; pass --max-batches N (or set data.batch_size "
                  "for one finite pass)", file=sys.stderr)
            return 2
    print(json.dumps(data_check(cfg, args.max_batches)))
    return 0


def cmd_quickstart(args) -> int:
    """The default end-to-end job on the embedded sample: shards, tokenizer, both stages on tiny random
    models, export, generation on the test split and its evaluation beside the MMseqs2 and BLAST baselines."""
    from data_tools.build import BuildOptions, build
    from data_tools.split import SplitOptions
    from megatron_p2t.config import load_config
    src = args.input
    if src is None:
        if os.path.exists(SHARED_SAMPLE):
            src = SHARED_SAMPLE
        else:
            from data_tools.fetch import fetch_uniprot
            src = os.path.join(args.out, "uniprot_slice.dat.gz")
            os.makedirs(args.out, exist_ok=True)
            if not os.path.exists(src):
                print("no local sample: downloading 2,000 reviewed entries with a FUNCTION comment from UniProt")
                fetch_uniprot(src, 2000)
    data_dir = os.path.join(args.out, "data")
    build(BuildOptions(inputs=[src], out=data_dir, skip_bad=True, samples_per_shard=64,
                       split=SplitOptions(seed=args.seed)))
    tok_dir = os.path.join(args.out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        cmd_make_tokenizer(argparse.Namespace(manifest=os.path.join(data_dir, "manifest.json"), out=tok_dir,
                                              vocab_size=2048))
    cfg = load_config(args.config, [f"data.manifest={data_dir}/manifest.json", f"data.text_tokenizer={tok_dir}",
                                    "data.epochs=1", "data.batch_size=16", "data.max_tokens="])
    print("stream (one pass of train, fixed batches):", json.dumps(data_check(cfg)))
    cfg = load_config(args.config, [f"data.manifest={data_dir}/manifest.json", f"data.text_tokenizer={tok_dir}"])
    print("stream (token-budget batches, 50 steps):", json.dumps(data_check(cfg, 50)))
    if args.data_only:
        return 0
    return _quickstart_model_stages(args, data_dir, tok_dir)


# quickstart --recipe: (stage-1 config, stage-2 config, where its runs go under --out, tiny ESM init). Protein2Text
# reads ESM's layer -2, before the final norm, where a tiny ESM at HF's init (std 0.02) has states too small for
# the resampler's random position row (models/tiny.make_esm)
RECIPES = {"prot2text_v2": ("align_tiny_cpu.yaml", "instruct_tiny_cpu.yaml", "", 0.02),
           "protein2text": ("protein2text_tiny_cpu.yaml", "protein2text_tiny_cpu.yaml", "protein2text", 0.25)}


def _quickstart_model_stages(args, data_dir: str, tok_dir: str) -> int:
    """Tiny random models through both stages of the recipe, export, generation and evaluation, each stage its own
    process (as users run them): the machinery end to end, not a model worth using."""
    import subprocess
    from megatron_p2t.parallel.launch_env import RENDEZVOUS
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}  # each stage is a job of its own
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    data = [f"data.manifest={data_dir}/manifest.json", f"data.text_tokenizer={tok_dir}"]
    stage1_cfg, stage2_cfg, sub, esm_std = RECIPES[args.recipe]
    out = os.path.join(args.out, sub)
    tiny = os.path.join(out, "tiny")
    models = [f"model.esm={tiny}/esm", f"model.llama={tiny}/llama"]
    align, instruct = os.path.join(out, "align"), os.path.join(out, "instruct")
    hf, report = os.path.join(out, "export"), os.path.join(out, "report")
    preds = os.path.join(out, "predictions.jsonl")
    steps = [
        ["make-tiny-models", "--tokenizer", tok_dir, "--out", tiny, "--esm-init-std", str(esm_std)],
        ["align", "--config", os.path.join(REPO, "configs", stage1_cfg), *data, *models,
         f"train.save_dir={align}", f"train.steps={args.align_steps}", "--resume", "auto"],
        ["instruct", "--config", os.path.join(REPO, "configs", stage2_cfg), *data, *models,
         f"instruct.init_from={align}", f"train.save_dir={instruct}", f"train.steps={args.instruct_steps}",
         "--resume", "auto"],
        ["export", "--checkpoint", instruct, "--out", hf, "--verify"],
        ["generate", "--model", hf, "--input", f"{data_dir}/manifest.json", "--split", "test", "--out", preds,
         "--max-new-tokens", "48"],
        ["evaluate", preds, "--baseline-manifest", f"{data_dir}/manifest.json", "--split", "test",
         "--baseline", "mmseqs", "--baseline", "blast", "--out", report],
    ]
    for cmd in steps:
        print(f"== megatron-p2t {' '.join(cmd[:1])}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "megatron_p2t", *cmd], env=env)
        if rc:
            print(f"error: `megatron-p2t {' '.join(cmd)}` failed with exit code {rc}", file=sys.stderr)
            return rc
    print(f"report: {report}/scores.md (tiny random models lose to the MMseqs2 and BLAST baselines; the numbers "
          f"are honest)")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _model_setup(args):
    """The run config and this process's Layout, for the commands that build the model."""
    from megatron_p2t.config import load_config
    from megatron_p2t.parallel import state
    cfg = load_config(args.config, args.overrides)
    return cfg, state.initialize(cfg.parallel)


def cmd_import_hf(args) -> int:
    """HF ESM + LLaMA (+ projector) directories -> a megatron checkpoint at the configured TP x PP layout."""
    from megatron_p2t.checkpoint import load, sharded
    cfg, layout = _model_setup(args)
    model, llama_cfg, _, pcfg = load.build_model(cfg, layout)
    load.load_hf(model, cfg, llama_cfg, pcfg, layout)
    sharded.save(model, args.out)
    sharded.write_run_info(args.out, cfg, "import")
    if torch_rank() == 0:
        print(f"megatron checkpoint ({layout.tp} x {layout.pp}, reloadable at any layout) -> {args.out}")
    return 0


def cmd_import_p2tv2(args) -> int:
    """Prot2Text-V2's layout -> a megatron checkpoint (each rank reads only its slice), reloadable at any layout,
    for `instruct` (instruct.init_from=OUT) or `export --format p2tv2`."""
    from megatron_p2t.checkpoint import load, p2tv2
    args.source, *overrides = args.inputs
    args.overrides = [*overrides, f"model.p2tv2={os.path.abspath(args.source)}"]
    p2tv2.read_config(args.source)  # a wrong directory fails here, before any process group exists
    cfg, layout = _model_setup(args)
    model, llama_cfg, _, pcfg = load.build_model(cfg, layout)
    load.load_hf(model, cfg, llama_cfg, pcfg, layout)
    p2tv2.save_imported(model, cfg, args.source, args.out)
    if torch_rank() == 0:
        print(f"megatron checkpoint of {args.source} ({layout.tp} x {layout.pp}, reloadable at any layout) -> "
              f"{args.out}")
    return 0


def cmd_export_hf(args) -> int:
    """A megatron checkpoint (any layout) -> HF directories llama/, esm/, projector/ under --out."""
    from megatron_p2t.checkpoint import load, p2t_hf, sharded
    cfg, layout = _model_setup(args)
    model, llama_cfg, esm_cfg, pcfg = load.build_model(cfg, layout)
    sharded.load(model, args.checkpoint)
    p2t_hf.hf_export(model, args.out, llama_cfg, esm_cfg, pcfg, layout.tp_rank, layout.tp,
                     esm_src=cfg.model.p2tv2 or cfg.model.esm)
    if torch_rank() == 0:
        print(f"HF directories llama/, esm/, projector/ -> {args.out}")
    return 0


def cmd_align(args) -> int:
    """Stage 1: H-SCALE alignment (ESM frozen, projector trained)."""
    from megatron_p2t.training.run_align import run
    return _train_stage(args, run)


def cmd_warmup_structure(args) -> int:
    """SEPIT's warm-up of the structure-aware encoder: contrastive vs a frozen text encoder + MLM + denoising."""
    from megatron_p2t.training.run_warmup import run
    return _train_stage(args, run)


def cmd_pretrain_lm(args) -> int:
    """A decoder-only recipe's stage 1: continual pretraining on proteins written as text (ProLLaMA)."""
    from megatron_p2t.training.run_instruct import run
    return _train_stage(args, lambda cfg, resume: run(cfg, resume, documents=True))


def cmd_instruct(args) -> int:
    """Stage 2: LoRA instruction tuning (ESM frozen, projector + decoder LoRA trained)."""
    from megatron_p2t.training.run_instruct import run
    return _train_stage(args, run)


def _stage_parser(sub, name: str, helptext: str) -> None:
    """A training stage's arguments; every stage accepts the DeepSpeed launcher's --local_rank."""
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in train.save_dir) or a "
                                                  "checkpoint directory")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")


def _train_stage(args, run) -> int:
    """A training stage from its config; pre-emption (checkpoint written) exits 0 so schedulers requeue."""
    from megatron_p2t.config import load_config
    from megatron_p2t.training.trainer import Stop
    cfg = load_config(args.config, args.overrides)
    try:
        result = run(cfg, resume=args.resume)
    except Stop as e:
        print(str(e), file=sys.stderr)
        result = None
    if result is not None and torch_rank() == 0:
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["final_loss"] = result["losses"][-1] if result["losses"] else None
        print(json.dumps(summary))
    return 0


def cmd_export(args) -> int:
    """A stage-2 checkpoint -> one HF-format directory (merged LLaMA, PEFT adapter, ESM, projector, tokenizer)."""
    from megatron_p2t import export
    report = export.main(args.checkpoint, args.out, fmt=args.format, verify_logits=args.verify,
                         overrides=args.overrides, argv=sys.argv[1:])
    if report is not None and torch_rank() == 0:
        print(json.dumps(report))
    return 0


def cmd_generate(args) -> int:
    """Descriptions for the proteins of a FASTA file or a shards split, with an exported model."""
    from megatron_p2t.generate import run
    print(json.dumps(run(args.model, args.input, args.out, split=args.split, batch_size=args.batch_size,
                         num_beams=args.beams, max_new_tokens=args.max_new_tokens, device=args.device,
                         with_name=not args.no_name, with_taxon=not args.no_taxon, structures=args.structures)))
    return 0


def cmd_generate_protein(args) -> int:
    """Proteins (and answers) from a decoder-only model, checked as proteins."""
    from megatron_p2t.generate_protein import run
    print(json.dumps(run(args.model, args.out, input_path=args.input, prompt=args.prompt, split=args.split,
                         only_tasks=args.tasks.split(",") if args.tasks else None, num_samples=args.num_samples,
                         batch_size=args.batch_size, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, num_beams=args.beams, sample=not args.greedy,
                         seed=args.seed, max_new_tokens=args.max_new_tokens,
                         repetition_penalty=args.repetition_penalty, device=args.device)))
    return 0


def cmd_evaluate(args) -> int:
    """Score predictions (and the nearest-neighbour baselines) against the references; or generated
    proteins (generate-protein's rows) against the training set."""
    from megatron_p2t import evaluate_proteins, evaluation
    from megatron_p2t.config import ConfigError
    systems = {os.path.splitext(os.path.basename(p))[0]: p for p in args.predictions}
    kinds = {evaluate_proteins.is_protein_file(p) for p in args.predictions}
    if args.baseline and (not args.baseline_manifest or kinds == {True}):
        raise ConfigError("--baseline names the nearest-neighbour baselines of generated descriptions: it needs "
                          "--baseline-manifest (their training set) and predictions from `generate`")
    if args.search and kinds != {True}:
        raise ConfigError("--search picks the tool that finds generated proteins' closest training proteins "
                          "(generate-protein rows); descriptions' nearest-neighbour baselines take --baseline")
    if kinds == {True}:
        report = evaluate_proteins.evaluate(systems, args.out, args.baseline_manifest, args.search or "mmseqs",
                                            args.threads)
        print(evaluate_proteins.markdown(report))
        return 0
    if len(kinds) > 1:
        raise ConfigError("evaluate scores one kind at a time: descriptions (generate) or proteins "
                          "(generate-protein); these files mix them")
    if args.baseline_manifest:
        train = [(k, s, t) for k, s, t, _ in evaluation.split_records(args.baseline_manifest, "train")]
        if not train:
            raise ConfigError(f"{args.baseline_manifest}: the train split is empty, so the nearest-neighbour "
                              f"baseline has nothing to search (build the dataset with a train split)")
        first = evaluation.read_predictions(args.predictions[0])
        queries = [(k, s, t) for k, s, t, _ in evaluation.split_records(args.baseline_manifest, args.split)
                   if k in first]
        if not queries:
            raise ValueError(f"none of {args.predictions[0]}'s proteins is in split {args.split!r} of "
                             f"{args.baseline_manifest}")
        os.makedirs(args.out, exist_ok=True)
        for tool in dict.fromkeys(args.baseline or ["mmseqs"]):
            name = f"{tool}_nearest_neighbour"
            systems[name] = os.path.join(args.out, name + ".jsonl")
            evaluation.nearest_neighbour(train, queries, systems[name], tool, args.threads)
    report = evaluation.evaluate(systems, args.out, bertscore_model=args.bertscore_model)
    print(evaluation.markdown(report))
    return 0


def cmd_cache_text(args) -> int:
    """Stage 1's frozen text side, computed once for every shard (run under the same launcher as align)."""
    from megatron_p2t.config import ConfigError, load_config
    from megatron_p2t.models.parts_config import align_objective
    from megatron_p2t.parallel import state
    from megatron_p2t.training.text_cache import build_cache
    cfg = load_config(args.config, args.overrides)
    if align_objective(cfg.align.objective, cfg.model.connector) != "hscale":
        raise ConfigError(f"cache-text precomputes H-SCALE's text side; this config's stage 1 is feature alignment "
                          f"(model.connector={cfg.model.connector}, align.objective={cfg.align.objective}), which "
                          f"runs the decoder on the text itself: run `align` without a cache")
    res = build_cache(cfg, state.initialize(dataclasses.replace(cfg.parallel.without_experts(), pipeline=1)))
    if torch_rank() == 0:
        print(json.dumps(res))
    return 0


def cmd_plan(args) -> int:
    """A capacity plan: reads model shapes from local config.json files or the known public checkpoints."""
    from megatron_p2t.config import load_config
    from megatron_p2t.plan import run
    cfg = load_config(args.config, args.overrides)
    stages = ["align", "instruct"] if args.stage == "both" else [args.stage]
    print(run(cfg, args.gpus, args.gpu, stages, args.mfu, args.json, args.gpus_per_node))
    return 0


def cmd_make_tiny_models(args) -> int:
    """Tiny random ESM-2 / LLaMA-3 HF checkpoints for CPU demos (the LLaMA sized to the given tokenizer)."""
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    vocab = len(load_text_tokenizer(args.tokenizer))
    vocab += (-vocab) % 8  # divisible by any tensor-parallel size up to 8
    tiny.make_llama(os.path.join(args.out, "llama"), vocab=vocab, layers=args.llama_layers, hidden=args.llama_hidden,
                    max_shard_size="4MB")
    tiny.make_esm(os.path.join(args.out, "esm"), init_std=args.esm_init_std)
    print(f"tiny llama (vocab {vocab}, {args.llama_layers} x {args.llama_hidden}) and esm -> {args.out}")
    return 0


def _leave_process_group() -> None:
    """Every rank of a command that succeeded leaves the process group together. A rank that exits while a
    peer's gloo threads still talk to it can abort that peer at interpreter shutdown ("terminate called without
    an active exception": seen after training, and in CI after cache-text, which did not leave)."""
    import torch.distributed as dist
    if dist.is_initialized():
        from megatron_p2t.parallel import state
        dist.barrier()
        state.destroy()


def torch_rank() -> int:
    """This process's rank, also after a command has left its process group (export destroys it before the
    report): every rank printing it once interleaved two reports on one line."""
    import torch
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-p2t", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quickstart", help="end to end on the embedded sample: shards -> stage 1 -> stage 2 -> "
                                          "export -> generate -> evaluate (tiny random models)")
    q.add_argument("--out", default=os.path.join(REPO, "runs", "quickstart"))
    q.add_argument("--input", help="a UniProt flat file (default: ../shared sample, else a REST download)")
    q.add_argument("--recipe", choices=sorted(RECIPES), default="prot2text_v2",
                   help="prot2text_v2: H-SCALE, then LoRA tuning with the projector; protein2text: feature alignment "
                        "of the Perceiver resampler, then LoRA tuning (its runs under OUT/protein2text)")
    q.add_argument("--config", default=os.path.join(REPO, "configs", "sample_cpu.yaml"))
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data-only", action="store_true", help="stop after the shards, tokenizer and streaming")
    q.add_argument("--align-steps", type=int, default=60)
    q.add_argument("--instruct-steps", type=int, default=60)
    d = sub.add_parser("data-check", help="stream the configured data once and report throughput and padding")
    d.add_argument("--config", required=True)
    d.add_argument("--max-batches", type=int)
    d.add_argument("overrides", nargs="*", help="section.key=value")
    t = sub.add_parser("make-tokenizer", help="train a small LLaMA-3-layout tokenizer on a split's texts "
                                              "(tests and offline demos; real runs use LLaMA-3.1's)")
    t.add_argument("--manifest", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=2048)
    for name, helptext in (("import-hf", "HF ESM + LLaMA directories -> a megatron checkpoint (run under "
                                         "torchrun/deepspeed with tensor x pipeline x data processes)"),
                           ("export-hf", "a megatron checkpoint from any layout -> HF directories")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--config", required=True)
        c.add_argument("--out", required=True)
        if name == "export-hf":
            c.add_argument("--checkpoint", required=True)
        c.add_argument("overrides", nargs="*", help="section.key=value")
    _stage_parser(sub, "align", "stage 1: H-SCALE contrastive alignment (run under deepspeed/torchrun, or "
                                "`deepspeed launch/align.sh` / `bash launch/align.sh`)")
    ct = sub.add_parser("cache-text", help="stage 1: precompute the frozen text side's pooled vectors beside the "
                                           "shards (then align with align.use_text_cache=true)")
    ct.add_argument("--config", required=True)
    ct.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ct.add_argument("overrides", nargs="*", help="section.key=value")
    _stage_parser(sub, "warmup-structure", "SEPIT's warm-up of the structure-aware encoder (model.encoder="
                                           "esm2_structure): pooled states vs a frozen text encoder (warmup."
                                           "text_encoder), masked residues, coordinate denoising; then stage 1 "
                                           "with model.structure_init=RUN")
    _stage_parser(sub, "pretrain-lm", "a decoder-only recipe's stage 1 (ProLLaMA): LoRA + embedding/output "
                                      "layer on proteins as text, documents packed with their own attention "
                                      "(`deepspeed launch/pretrain_lm.sh`)")
    _stage_parser(sub, "instruct", "stage 2: LoRA instruction tuning (`deepspeed launch/instruct.sh` / "
                                   "`bash launch/instruct.sh`); instruct.init_from names the stage-1 run")
    ex = sub.add_parser("export", help="a stage-2 checkpoint (any TP) -> one HF directory: merged LLaMA, PEFT "
                                       "adapter, ESM, projector, tokenizer, model card")
    ex.add_argument("--checkpoint", required=True, help="an `instruct` run directory (its latest) or a step directory")
    ex.add_argument("--out", required=True)
    ex.add_argument("--verify", action="store_true", help="load the export with transformers and compare its logits "
                                                          "with the megatron model's on validation prompts")
    ex.add_argument("--format", choices=["megatron_p2t", "p2tv2"], default="megatron_p2t",
                    help="p2tv2: Prot2Text-V2's own layout (Esm2LlamaInstructForCausalLM), from an `instruct` run "
                         "or an `import-p2tv2` checkpoint")
    ex.add_argument("overrides", nargs="*", help="section.key=value over the run's saved config")
    ip = sub.add_parser("import-p2tv2", help="a published Prot2Text-V2 directory -> a megatron checkpoint (run "
                                             "under torchrun/deepspeed with tensor x pipeline processes)")
    ip.add_argument("--out", required=True)
    ip.add_argument("--config", default=None, help="a run config for the layout and dtype (default: built-in)")
    ip.add_argument("inputs", nargs="+", metavar="SOURCE [section.key=value ...]",
                    help="the Prot2Text-V2 directory (config.json esm2llama_instruct + safetensors), then overrides "
                         "such as parallel.tensor=2 model.dtype=bfloat16")
    ge = sub.add_parser("generate", help="descriptions for proteins (FASTA or a shards manifest) with an exported "
                                         "model; resumable")
    ge.add_argument("--model", required=True, help="a `megatron-p2t export` directory")
    ge.add_argument("--input", required=True, help="proteins.fasta, or a shards manifest.json (with --split)")
    ge.add_argument("--split", default="test")
    ge.add_argument("--out", required=True, help="predictions JSONL (appended to; done proteins are skipped)")
    ge.add_argument("--batch-size", type=int, default=8)
    ge.add_argument("--beams", type=int, default=1, help="1: greedy; Prot2Text-V2 reports beam 4")
    ge.add_argument("--max-new-tokens", type=int, default=256)
    ge.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ge.add_argument("--no-name", action="store_true", help="leave the protein name out of the prompt")
    ge.add_argument("--no-taxon", action="store_true", help="leave the taxon out of the prompt")
    ge.add_argument("--structures", metavar="DIR|TAR", help="a structure-aware model with a FASTA input: the "
                    "proteins' PDB/mmCIF/AlphaFold files named by accession (shards carry their own)")
    gp = sub.add_parser("generate-protein", help="sequences (and answers) from a decoder-only protein LM export "
                                                 "(ProLLaMA-style prompts), checked as proteins; resumable")
    gp.add_argument("--model", required=True, help="an `export` of a decoder-only run, or an HF LlamaForCausalLM "
                                                   "directory with its tokenizer")
    gp.add_argument("--prompt", help="one prompt, e.g. '[Generate by superfamily] Superfamily=<...>' or 'Seq=<'")
    gp.add_argument("--input", help="tasks: JSONL or Alpaca JSON ({instruction, input[, output, id]}), or a "
                                    "built Alpaca manifest.json (with --split)")
    gp.add_argument("--split", default="test")
    gp.add_argument("--tasks", help="only the rows of these tasks, comma-separated (e.g. determine_superfamily)")
    gp.add_argument("--out", required=True, help="JSONL (appended to; rows already there are skipped)")
    gp.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    gp.add_argument("--temperature", type=float, default=1.0)
    gp.add_argument("--top-k", type=int, default=0, help="0: off")
    gp.add_argument("--top-p", type=float, default=1.0)
    gp.add_argument("--repetition-penalty", type=float, default=1.0, help="ProLLaMA's README uses 1.2")
    gp.add_argument("--greedy", action="store_true", help="no sampling (greedy, or beam search with --beams)")
    gp.add_argument("--beams", type=int, default=1)
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--max-new-tokens", type=int, default=512)
    gp.add_argument("--batch-size", type=int, default=8)
    gp.add_argument("--device", default=None)
    ev = sub.add_parser("evaluate", help="BLEU-2/4, ROUGE-1/2/L, exact match (+ BERTScore) of predictions, "
                                         "next to the MMseqs2 / BLAST nearest-neighbour baselines; for "
                                         "generate-protein rows: validity, lengths, composition, novelty, "
                                         "diversity, accuracy")
    ev.add_argument("predictions", nargs="+", help="JSONL files from generate (one system each)")
    ev.add_argument("--out", required=True, help="directory for scores.md, scores.json, by_length.png")
    ev.add_argument("--baseline-manifest", help="shards manifest: run the nearest-neighbour baseline (train -> "
                                                "--split); for generated proteins, the training set they are "
                                                "compared with")
    ev.add_argument("--baseline", action="append", choices=["mmseqs", "blast"],
                    help="with --baseline-manifest: the search tool of the nearest-neighbour baseline, repeatable "
                         "(default mmseqs; blast runs NCBI blastp)")
    ev.add_argument("--search", choices=["mmseqs", "blast"],
                    help="generated proteins: the tool that finds each one's closest training protein for novelty "
                         "and family match (default mmseqs; blast runs NCBI blastp, slower and more sensitive)")
    ev.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the search tools' threads")
    ev.add_argument("--split", default="test")
    ev.add_argument("--bertscore-model", help="a local HF encoder directory for BERTScore")
    pl = sub.add_parser("plan", help="memory per GPU and estimated step time of every TP x DP layout for a config")
    pl.add_argument("--config", required=True)
    pl.add_argument("--gpus", type=int, required=True, help="GPUs in the job (nodes x GPUs per node)")
    pl.add_argument("--gpu", default="h100-80gb", help="device kind: h100-80gb, h200-141gb, a100-80gb, cpu")
    pl.add_argument("--gpus-per-node", type=int, default=None, help="default: 8 (1 for cpu)")
    pl.add_argument("--stage", choices=["align", "instruct", "both"], default="both")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("overrides", nargs="*")
    tm = sub.add_parser("make-tiny-models", help="tiny random ESM-2 and LLaMA-3 HF checkpoints for CPU demos")
    tm.add_argument("--tokenizer", required=True)
    tm.add_argument("--out", required=True)
    tm.add_argument("--llama-hidden", type=int, default=64,
                    help="width of the LLaMA; the stage-1 retrieval demo needs 512 (see README)")
    tm.add_argument("--llama-layers", type=int, default=4)
    tm.add_argument("--esm-init-std", type=float, default=0.02,
                    help="std of the ESM's random weights (HF's 0.02; 0.25 for a connector reading an inner layer)")
    args, extra = p.parse_known_args(argv)
    # argparse stops filling a positional list once an option follows it (`import-p2tv2 DIR --out O a=b`):
    # trailing section.key=value words still belong to it
    if extra and hasattr(args, "inputs") and all("=" in e and not e.startswith("-") for e in extra):
        args.inputs += extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from data_tools.records import DataError
    from megatron_p2t.config import ConfigError
    from megatron_p2t.checkpoint.hf_dir import CheckpointError
    from megatron_p2t.parallel.layout import LayoutError
    from megatron_p2t.plan import PlanError
    try:
        commands = {"quickstart": cmd_quickstart, "data-check": cmd_data_check, "make-tokenizer": cmd_make_tokenizer,
                    "import-hf": cmd_import_hf, "export-hf": cmd_export_hf, "align": cmd_align,
                    "instruct": cmd_instruct, "export": cmd_export, "pretrain-lm": cmd_pretrain_lm,
                    "warmup-structure": cmd_warmup_structure,
                    "generate": cmd_generate, "evaluate": cmd_evaluate, "generate-protein": cmd_generate_protein,
                    "cache-text": cmd_cache_text, "make-tiny-models": cmd_make_tiny_models, "plan": cmd_plan,
                    "import-p2tv2": cmd_import_p2tv2}
        rc = commands[args.cmd](args)
    except (DataError, ConfigError, FileNotFoundError, CheckpointError, LayoutError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rc == 0:
        _leave_process_group()
    return rc
