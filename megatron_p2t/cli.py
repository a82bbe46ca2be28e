"""megatron-p2t: one entry point, a subcommand per stage. Launch scripts in launch/ only wrap it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SAMPLE = os.path.join(REPO, "..", "shared", "data", "swissprot_sample.dat.gz")


def _texts_from_manifest(manifest: str, split: str = "train"):
    from data_tools.shards import iter_shard_samples
    from megatron_p2t.data.loader import read_manifest
    _, urls, _, _ = read_manifest(manifest, split)
    for u in urls:
        for _, s in iter_shard_samples(u):
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
        cfg.data.epochs = 1  # a check makes one pass unless told to stop earlier
        if cfg.data.batch_size is None:
            print("error: the token-budget stream is endless; pass --max-batches N (or set data.batch_size "
                  "for one finite pass)", file=sys.stderr)
            return 2
    print(json.dumps(data_check(cfg, args.max_batches)))
    return 0


def cmd_quickstart(args) -> int:
    """The default end-to-end job on the embedded sample: build shards, a tokenizer, stream them."""
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
    return 0


def _model_setup(args):
    from megatron_p2t.config import load_config
    from megatron_p2t.models import build as model_build
    from megatron_p2t.parallel import state
    cfg = load_config(args.config, args.overrides)
    state.initialize(tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline, seed=cfg.parallel.seed)
    return cfg, model_build


def cmd_import_hf(args) -> int:
    """HF ESM + LLaMA (+ projector) directories -> a megatron checkpoint at the configured TP x PP layout."""
    from megatron_p2t.checkpoint import sharded
    cfg, mb = _model_setup(args)
    model, llama_cfg, _, pcfg = mb.build(cfg)
    mb.load_hf(model, cfg, llama_cfg, pcfg)
    sharded.save(model, args.out)
    mb.write_run_info(args.out, cfg)
    if torch_rank() == 0:
        print(f"megatron checkpoint ({cfg.parallel.tensor} x {cfg.parallel.pipeline}, reloadable at any layout) "
              f"-> {args.out}")
    return 0


def cmd_export_hf(args) -> int:
    """A megatron checkpoint (any layout) -> HF directories llama/, esm/, projector/ under --out."""
    from megatron.core import parallel_state as ps

    from megatron_p2t.checkpoint import sharded
    from megatron_p2t.models import p2t
    cfg, mb = _model_setup(args)
    model, llama_cfg, esm_cfg, pcfg = mb.build(cfg)
    sharded.load(model, args.checkpoint)
    p2t.hf_export(model, args.out, llama_cfg, esm_cfg, pcfg, ps.get_tensor_model_parallel_rank(),
                  cfg.parallel.tensor)
    if torch_rank() == 0:
        print(f"HF directories llama/, esm/, projector/ -> {args.out}")
    return 0


def cmd_align(args) -> int:
    """Stage 1: H-SCALE alignment (ESM frozen, projector trained)."""
    from megatron_p2t.config import load_config
    from megatron_p2t.training.run_align import run
    from megatron_p2t.training.trainer import Stop
    cfg = load_config(args.config, args.overrides)
    try:
        result = run(cfg, resume=args.resume)
    except Stop as e:
        print(str(e), file=sys.stderr)
        return 0
    if torch_rank() == 0:
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["final_loss"] = result["losses"][-1] if result["losses"] else None
        print(json.dumps(summary))
    return 0


def cmd_instruct(args) -> int:
    """Stage 2: LoRA instruction tuning (ESM frozen, projector + decoder LoRA trained)."""
    from megatron_p2t.config import load_config
    from megatron_p2t.training.run_instruct import run
    from megatron_p2t.training.trainer import Stop
    cfg = load_config(args.config, args.overrides)
    try:
        result = run(cfg, resume=args.resume)
    except Stop as e:
        print(str(e), file=sys.stderr)
        return 0
    if torch_rank() == 0:
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["final_loss"] = result["losses"][-1] if result["losses"] else None
        print(json.dumps(summary))
    return 0


def cmd_cache_text(args) -> int:
    """Stage 1's frozen text side, computed once for every shard (run under the same launcher as align)."""
    from megatron_p2t.config import load_config
    from megatron_p2t.parallel import state
    from megatron_p2t.training.text_cache import build_cache
    cfg = load_config(args.config, args.overrides)
    state.initialize(tp=cfg.parallel.tensor, pp=1, seed=cfg.parallel.seed)
    res = build_cache(cfg)
    if torch_rank() == 0:
        print(json.dumps(res))
    return 0


def cmd_make_tiny_models(args) -> int:
    """Tiny random ESM-2 / LLaMA-3 HF checkpoints for CPU demos (the LLaMA sized to the given tokenizer)."""
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    vocab = len(load_text_tokenizer(args.tokenizer))
    vocab += (-vocab) % 8  # divisible by any tensor-parallel size up to 8
    tiny.make_llama(os.path.join(args.out, "llama"), vocab=vocab, layers=4, hidden=64)
    tiny.make_esm(os.path.join(args.out, "esm"))
    print(f"tiny llama (vocab {vocab}) and esm -> {args.out}")
    return 0


def torch_rank() -> int:
    import torch
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-p2t", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quickstart", help="end to end on the embedded sample (today: shards -> stream)")
    q.add_argument("--out", default=os.path.join(REPO, "runs", "quickstart"))
    q.add_argument("--input", help="a UniProt flat file (default: ../shared sample, else a REST download)")
    q.add_argument("--config", default=os.path.join(REPO, "configs", "sample_cpu.yaml"))
    q.add_argument("--seed", type=int, default=0)
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
    al = sub.add_parser("align", help="stage 1: H-SCALE contrastive alignment (run under deepspeed/torchrun, or "
                                      "`deepspeed launch/align.sh` / `bash launch/align.sh`)")
    al.add_argument("--config", required=True)
    al.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in train.save_dir) or a "
                                                   "checkpoint directory")
    al.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the DeepSpeed launcher's
    al.add_argument("overrides", nargs="*", help="section.key=value")
    ct = sub.add_parser("cache-text", help="stage 1: precompute the frozen text side's pooled vectors beside the "
                                           "shards (then align with align.use_text_cache=true)")
    ct.add_argument("--config", required=True)
    ct.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ct.add_argument("overrides", nargs="*", help="section.key=value")
    ins = sub.add_parser("instruct", help="stage 2: LoRA instruction tuning (`deepspeed launch/instruct.sh` / "
                                          "`bash launch/instruct.sh`); instruct.init_from names the stage-1 run")
    ins.add_argument("--config", required=True)
    ins.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in train.save_dir) or a "
                                                    "checkpoint directory")
    ins.add_argument("overrides", nargs="*", help="section.key=value")
    tm = sub.add_parser("make-tiny-models", help="tiny random ESM-2 and LLaMA-3 HF checkpoints for CPU demos")
    tm.add_argument("--tokenizer", required=True)
    tm.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from data_tools.records import DataError
    from megatron_p2t.config import ConfigError
    from megatron_p2t.checkpoint.hf_dir import CheckpointError
    from megatron_p2t.parallel.state import LayoutError
    try:
        return {"quickstart": cmd_quickstart, "data-check": cmd_data_check, "make-tokenizer": cmd_make_tokenizer,
                "import-hf": cmd_import_hf, "export-hf": cmd_export_hf, "align": cmd_align, "instruct": cmd_instruct,
                "cache-text": cmd_cache_text, "make-tiny-models": cmd_make_tiny_models}[args.cmd](args)
    except (DataError, ConfigError, FileNotFoundError, CheckpointError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
