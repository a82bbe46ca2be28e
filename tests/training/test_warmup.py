"""SEPIT's warm-up of the structure-aware encoder (`warmup-structure`): its three losses learn at DP=2 with the
contrastive negatives gathered, and stage 1 starts from its distance bias."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_denoising_head_turns_with_the_coordinates():
    """The predicted noise is a sum of pair directions: rotating and moving the input rotates the prediction."""
    from megatron_p2t.models.esm_structure import DenoisingHead
    torch.manual_seed(0)
    head = DenoisingHead(16, 4)
    states, xyz = torch.randn(2, 9, 16), torch.randn(2, 9, 3) * 5
    known = torch.ones(2, 9, dtype=torch.bool)
    known[1, 6:] = False
    q, _ = torch.linalg.qr(torch.randn(3, 3))
    out = head(states, xyz, known)
    moved = head(states, xyz @ q.T + torch.tensor([3.0, -1.0, 2.0]), known)
    torch.testing.assert_close(moved, out @ q.T, atol=1e-5, rtol=1e-5)


def _tiny_bert(path, tokenizer):
    from transformers import BertConfig, BertModel
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    vocab = len(load_text_tokenizer(tokenizer))
    torch.manual_seed(3)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256), add_pooling_layer=False
              ).save_pretrained(path)
    for f in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, f), path)
    return path


@pytest.mark.slow
def test_warmup_learns_its_three_losses_and_stage1_starts_from_it(tiny_tokenizer, tmp_path):
    from data_tools.build import BuildOptions, build
    from data_tools.clean import CleanOptions
    from data_tools.split import SplitOptions
    from megatron_p2t.checkpoint.esm_structure_hf import structure_tensors
    from megatron_p2t.models import tiny
    from tests.synthetic import write_folds
    src = write_folds(str(tmp_path / "src"), ["Forms a helical bundle.", "Binds DNA as a 3-10 helix.",
                                              "Assembles into amyloid sheets."], per_fold=40)
    build(BuildOptions(inputs=[src["fasta"]], annotations=src["annotations"], out=str(tmp_path / "data"),
                       quiet=True, samples_per_shard=64, processes=2, structures=src["structures"],
                       clean=CleanOptions(min_length=10),
                       split=SplitOptions(mode="lists", lists={k: src[k] for k in ("train", "valid", "test")})))
    vocab = len(__import__("megatron_p2t.data.text_tokenizer", fromlist=["x"]).load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(tmp_path / "llama"), vocab=vocab + (-vocab) % 8)
    tiny.make_esm(str(tmp_path / "esm"), init_std=0.25)
    bert = _tiny_bert(str(tmp_path / "bert"), tiny_tokenizer)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    common = ["--config", os.path.join(ROOT, "configs", "sepit_tiny_cpu.yaml"),
              f"data.manifest={tmp_path}/data/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
              f"model.encoder_path={tmp_path}/esm", f"model.llama={tmp_path}/llama", "train.tensorboard=false",
              # as configs/sepit.yaml: stage 2's experts over 4 data-parallel ranks, which these stages (no experts;
              # DP 2 and 1) do not need
              "model.decoder=llama_moe", "parallel.expert=4"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "megatron_p2t", "warmup-structure", *common, f"warmup.text_encoder={bert}",
                        "warmup.dim=32", "train.steps=150", "train.save_every=150", "train.lr=0.01",
                        "train.log_every=1", f"train.save_dir={tmp_path}/warmup"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(l) for l in open(tmp_path / "warmup" / "train_log.jsonl")]
    assert len(log) == 150 and all(math.isfinite(e["loss"]) for e in log)
    mean = lambda k, a, b: sum(e[k] for e in log[a:b]) / (b - a)
    for k, factor in (("contrastive", 0.85), ("mlm", 0.85), ("denoise", 0.99)):
        # measured (one thread per process): contrastive 2.89 -> 2.00, mlm 4.10 -> 3.06, denoise 0.99 -> 0.95
        assert mean(k, 120, 150) < factor * mean(k, 0, 15), (k, mean(k, 0, 15), mean(k, 120, 150))
    info = json.load(open(tmp_path / "warmup" / "megatron_p2t.json"))
    assert info["stage"] == "warmup-structure"
    warm = structure_tensors(os.path.join(tmp_path, "warmup", open(tmp_path / "warmup" / "latest").read().strip()))
    assert warm is not None and set(warm) >= {"means", "linear_heads.weight", "linear_embed.weight"}
    # stage 1 from the warm-up: its distance bias is where stage 1 starts (lr 0: it stays there)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "align", *common, f"model.structure_init={tmp_path}/warmup",
                        "train.steps=2", "train.save_every=2", "train.lr=0.0", f"train.save_dir={tmp_path}/align"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    aligned = structure_tensors(os.path.join(tmp_path, "align", open(tmp_path / "align" / "latest").read().strip()))
    for k, v in warm.items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=0)
