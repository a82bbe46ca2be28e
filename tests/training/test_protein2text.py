"""Protein2Text on the shared trainer, end to end with tiny random models on synthetic families (CPU): feature
alignment (the connector alone learns), then QA conversations mixed with function text from it, export with
--verify, generation of descriptions and answers, evaluation."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "train_log.jsonl"))]


def test_resampler_recipe_learns_function_text_and_answers_from_the_sequence(tiny_tokenizer, sample_records,
                                                                              tmp_path):
    """Learnability as for Prot2Text-V2 (tests/training/test_instruct.py): each family's text and answers are
    fixed by its sequences, and held-out members (new sequences) must get them right -- through 16 latents that
    do not depend on the protein's length. Stage 1 is `align` on a resampler config (LLaVA's feature alignment),
    stage 2 mixes QA conversations 1:1 with the function text. The tiny ESM's weights are drawn wider than HF's
    0.02 (models/tiny.make_esm) so that its layer -2 states are not drowned by the resampler's position row."""
    from data_tools.build import BuildOptions, build
    from data_tools.split import SplitOptions
    from megatron_p2t.evaluation import text as evaluation
    from megatron_p2t.inference import generate
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    from tests.synthetic import write_families, write_family_qa
    texts = list(dict.fromkeys(" ".join(r.function.split()[:6]).rstrip(".,;") + "." for r in sample_records
                               if r.function))
    src = write_families(str(tmp_path / "src"), texts, families=16, lengths=(30, 60))
    lists = SplitOptions(mode="lists", lists={k: src[k] for k in ("train", "valid", "test")})
    build(BuildOptions(inputs=[src["fasta"]], annotations=src["annotations"], out=str(tmp_path / "data"),
                       quiet=True, samples_per_shard=64, processes=2, split=lists))
    build(BuildOptions(inputs=[write_family_qa(str(tmp_path / "src"), src["fasta"])], out=str(tmp_path / "qa"),
                       quiet=True, samples_per_shard=64, processes=2, split=lists))
    vocab = len(load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(tmp_path / "llama"), vocab=vocab + (-vocab) % 8, init_std=0.25)
    tiny.make_esm(str(tmp_path / "esm"), init_std=0.25)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), DS_ACCELERATOR="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "megatron_p2t", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=900)
    common = ["--config", os.path.join(ROOT, "configs", "protein2text_tiny_cpu.yaml"),
              f"data.manifest={tmp_path}/data/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
              f"model.encoder_path={tmp_path}/esm", f"model.llama={tmp_path}/llama"]
    # stage 1: LLaVA's feature alignment, the decoder frozen without adapters, the connector alone trained
    r = run("align", *common, "train.lr=0.005", "train.steps=40", "train.save_every=40",
            f"train.save_dir={tmp_path}/align")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.load(open(tmp_path / "align" / "megatron_p2t.json"))
    assert info["stage"] == "align-feature" and info["config"]["model"]["llm_lora"]["r"] == 0
    first, last = _losses(tmp_path / "align")[:5], _losses(tmp_path / "align")[-5:]
    assert sum(last) < 0.9 * sum(first), (first, last)                  # the connector alone lowered the loss
    # stage 2: from stage 1's connector, QA conversations drawn beside the function text
    r = run("instruct", *common, f"instruct.init_from={tmp_path}/align", "train.lr=0.01",
            "instruct.connector_lr=0.002", "train.steps=400", "train.save_every=400",
            f"instruct.mix=[{{manifest: {tmp_path}/qa/manifest.json, weight: 1.0}}]", "model.llm_lora.r=16",
            "model.llm_lora.dropout=0.0", f"train.save_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("export", "--checkpoint", f"{tmp_path}/run", "--out", f"{tmp_path}/hf", "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["max_abs_logit_diff"] <= 1e-4
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "connector" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.mm_resampler.latents", "model.mm_resampler.layers.1.0.to_kv.weight",
            "model.mm_projector.2.bias"} <= names                           # the released names
    preds = f"{tmp_path}/preds.jsonl"
    generate.run(f"{tmp_path}/hf", f"{tmp_path}/data/manifest.json", preds, split="test", max_new_tokens=24)
    generate.run(f"{tmp_path}/hf", f"{tmp_path}/qa/manifest.json", preds, split="test", max_new_tokens=8)
    rep = evaluation.evaluate({"protein2text": preds}, str(tmp_path / "report"))
    assert rep["n"] == 16 and rep["qa"]["n"] == 32
    rows = evaluation.read_predictions(preds)
    assert rep["systems"]["protein2text"]["exact_match"] >= 90.0, rows
    qa = rep["qa"]["systems"]["protein2text"]
    assert qa["yes_no_n"] == 16 and qa["yes_no_accuracy"] >= 90.0, rows
    assert rep["qa"]["by_question"]["protein2text"]["which family is it from"]["exact_match"] >= 90.0, rows
