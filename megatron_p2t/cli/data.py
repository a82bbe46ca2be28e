"""Data and demo commands: the quickstart, streaming checks, a small tokenizer, tiny random models."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from megatron_p2t.cli.table import OVERRIDES, REPO, arg, command

SHARED_SAMPLE = os.path.join(REPO, "..", "shared", "data", "swissprot_sample.dat.gz")


def _texts_from_manifest(manifest: str, split: str = "train"):
    from megatron_p2t.data.shards import split_samples
    for s in split_samples(manifest, split):
        yield s["txt"].decode()


@command("make-tokenizer", "train a small LLaMA-3-layout tokenizer on a split's texts (tests and offline demos; real "
                           "runs use LLaMA-3.1's)",
         arg("--manifest", required=True), arg("--out", required=True), arg("--vocab-size", type=int, default=2048))
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


@command("data-check", "stream the configured data once and report throughput and padding",
         arg("--config", required=True), arg("--max-batches", type=int), OVERRIDES)
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


# quickstart --recipe: (stage-1 config, stage-2 config, where its runs go under --out, tiny ESM init). Protein2Text
# reads ESM's layer -2, before the final norm, where a tiny ESM at HF's init (std 0.02) has states too small for
# the resampler's random position row (models/tiny.make_esm)
RECIPES = {"prot2text_v2": ("align_tiny_cpu.yaml", "instruct_tiny_cpu.yaml", "", 0.02),
           "protein2text": ("protein2text_tiny_cpu.yaml", "protein2text_tiny_cpu.yaml", "protein2text", 0.25)}


@command("quickstart", "end to end on the embedded sample: shards -> stage 1 -> stage 2 -> export -> generate -> "
                       "evaluate (tiny random models)",
         arg("--out", default=os.path.join(REPO, "runs", "quickstart")),
         arg("--input", help="a UniProt flat file (default: ../shared sample, else a REST download)"),
         arg("--recipe", choices=sorted(RECIPES), default="prot2text_v2",
             help="prot2text_v2: H-SCALE, then LoRA tuning with the projector; protein2text: feature alignment of "
                  "the Perceiver resampler, then LoRA tuning (its runs under OUT/protein2text)"),
         arg("--config", default=os.path.join(REPO, "configs", "sample_cpu.yaml")),
         arg("--seed", type=int, default=0),
         arg("--data-only", action="store_true", help="stop after the shards, tokenizer and streaming"),
         arg("--align-steps", type=int, default=60), arg("--instruct-steps", type=int, default=60))
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
    models = [f"model.encoder_path={tiny}/esm", f"model.llama={tiny}/llama"]
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


@command("make-tiny-models", "tiny random ESM-2 and LLaMA-3 HF checkpoints for CPU demos",
         arg("--tokenizer", required=True), arg("--out", required=True),
         arg("--llama-hidden", type=int, default=64,
             help="width of the LLaMA; the stage-1 retrieval demo needs 512 (see README)"),
         arg("--llama-layers", type=int, default=4),
         arg("--esm-init-std", type=float, default=0.02,
             help="std of the ESM's random weights (HF's 0.02; 0.25 for a connector reading an inner layer)"))
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
