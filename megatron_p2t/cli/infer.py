"""Inference and evaluation commands, and the capacity plan."""
from __future__ import annotations

import json
import os

from megatron_p2t.cli.table import arg, command


@command("generate", "descriptions for proteins (FASTA or a shards manifest) with an exported model; resumable",
         arg("--model", required=True, help="a `megatron-p2t export` directory"),
         arg("--input", required=True, help="proteins.fasta, or a shards manifest.json (with --split)"),
         arg("--split", default="test"),
         arg("--out", required=True, help="predictions JSONL (appended to; done proteins are skipped)"),
         arg("--batch-size", type=int, default=8),
         arg("--beams", type=int, default=1, help="1: greedy; Prot2Text-V2 reports beam 4"),
         arg("--max-new-tokens", type=int, default=256),
         arg("--device", default=None, help="default: cuda when available, else cpu"),
         arg("--no-name", action="store_true", help="leave the protein name out of the prompt"),
         arg("--no-taxon", action="store_true", help="leave the taxon out of the prompt"),
         arg("--structures", metavar="DIR|TAR", help="a structure-aware model with a FASTA input: the proteins' "
             "PDB/mmCIF/AlphaFold files named by accession (shards carry their own)"))
def cmd_generate(args) -> int:
    """Descriptions for the proteins of a FASTA file or a shards split, with an exported model."""
    from megatron_p2t.inference.generate import run
    print(json.dumps(run(args.model, args.input, args.out, split=args.split, batch_size=args.batch_size,
                         num_beams=args.beams, max_new_tokens=args.max_new_tokens, device=args.device,
                         with_name=not args.no_name, with_taxon=not args.no_taxon, structures=args.structures)))
    return 0


@command("generate-protein", "sequences (and answers) from a decoder-only protein LM export (ProLLaMA-style "
                             "prompts), checked as proteins; resumable",
         arg("--model", required=True, help="an `export` of a decoder-only run, or an HF LlamaForCausalLM directory "
                                            "with its tokenizer"),
         arg("--prompt", help="one prompt, e.g. '[Generate by superfamily] Superfamily=<...>' or 'Seq=<'"),
         arg("--input", help="tasks: JSONL or Alpaca JSON ({instruction, input[, output, id]}), or a built Alpaca "
                             "manifest.json (with --split)"),
         arg("--split", default="test"),
         arg("--tasks", help="only the rows of these tasks, comma-separated (e.g. determine_superfamily)"),
         arg("--out", required=True, help="JSONL (appended to; rows already there are skipped)"),
         arg("--num-samples", type=int, default=1, help="samples per prompt"),
         arg("--temperature", type=float, default=1.0),
         arg("--top-k", type=int, default=0, help="0: off"),
         arg("--top-p", type=float, default=1.0),
         arg("--repetition-penalty", type=float, default=1.0, help="ProLLaMA's README uses 1.2"),
         arg("--greedy", action="store_true", help="no sampling (greedy, or beam search with --beams)"),
         arg("--beams", type=int, default=1), arg("--seed", type=int, default=0),
         arg("--max-new-tokens", type=int, default=512), arg("--batch-size", type=int, default=8),
         arg("--device", default=None))
def cmd_generate_protein(args) -> int:
    """Proteins (and answers) from a decoder-only model, checked as proteins."""
    from megatron_p2t.inference.generate_protein import run
    print(json.dumps(run(args.model, args.out, input_path=args.input, prompt=args.prompt, split=args.split,
                         only_tasks=args.tasks.split(",") if args.tasks else None, num_samples=args.num_samples,
                         batch_size=args.batch_size, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, num_beams=args.beams, sample=not args.greedy,
                         seed=args.seed, max_new_tokens=args.max_new_tokens,
                         repetition_penalty=args.repetition_penalty, device=args.device)))
    return 0


@command("evaluate", "BLEU-2/4, ROUGE-1/2/L, exact match (+ BERTScore) of predictions, next to the MMseqs2 / BLAST "
                     "nearest-neighbour baselines; for generate-protein rows: validity, lengths, composition, "
                     "novelty, diversity, accuracy",
         arg("predictions", nargs="+", help="JSONL files from generate (one system each)"),
         arg("--out", required=True, help="directory for scores.md, scores.json, by_length.png"),
         arg("--baseline-manifest", help="shards manifest: run the nearest-neighbour baseline (train -> --split); "
                                         "for generated proteins, the training set they are compared with"),
         arg("--baseline", action="append", choices=["mmseqs", "blast"],
             help="with --baseline-manifest: the search tool of the nearest-neighbour baseline, repeatable (default "
                  "mmseqs; blast runs NCBI blastp)"),
         arg("--search", choices=["mmseqs", "blast"],
             help="generated proteins: the tool that finds each one's closest training protein for novelty and "
                  "family match (default mmseqs; blast runs NCBI blastp, slower and more sensitive)"),
         arg("--threads", type=int, default=os.cpu_count() or 1, help="the search tools' threads"),
         arg("--split", default="test"),
         arg("--bertscore-model", help="a local HF encoder directory for BERTScore"))
def cmd_evaluate(args) -> int:
    """Score predictions (and the nearest-neighbour baselines) against the references; or generated
    proteins (generate-protein's rows) against the training set."""
    from megatron_p2t.evaluation import proteins as evaluate_proteins
    from megatron_p2t.evaluation import text as evaluation
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


@command("plan", "memory per GPU and estimated step time of every TP x DP layout for a config",
         arg("--config", required=True),
         arg("--gpus", type=int, required=True, help="GPUs in the job (nodes x GPUs per node)"),
         arg("--gpu", default="h100-80gb", help="device kind: h100-80gb, h200-141gb, a100-80gb, cpu"),
         arg("--gpus-per-node", type=int, default=None, help="default: 8 (1 for cpu)"),
         arg("--stage", choices=["align", "instruct", "both"], default="both"),
         arg("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes"),
         arg("--json", action="store_true"), arg("overrides", nargs="*"))
def cmd_plan(args) -> int:
    """A capacity plan: reads model shapes from local config.json files or the known public checkpoints."""
    from megatron_p2t.config import load_config
    from megatron_p2t.plan import run
    cfg = load_config(args.config, args.overrides)
    stages = ["align", "instruct"] if args.stage == "both" else [args.stage]
    print(run(cfg, args.gpus, args.gpu, stages, args.mfu, args.json, args.gpus_per_node))
    return 0
