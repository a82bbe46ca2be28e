"""Prot2Text-V2 as users have it: a tiny model of the authors' classes (tests/checkpoint/authors_p2tv2.py) saved
with `save_pretrained` as sharded safetensors under the pinned transformers -- which writes ESM's LayerNorms as
gamma/beta and its rotary buffer per layer -- in bf16 and fp32. Imported and exported back bit for bit with
every dtype and name; read directly by `generate` and `Prot2TextForGeneration`; and our own fresh export loaded
by their class with nothing missing and nothing unexpected."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.checkpoint import authors_p2tv2 as authors
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
PH = "<|reserved_special_token_1|>"


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _run(args, timeout=900):
    r = subprocess.run([sys.executable, *args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _stored(path):
    """{stored name: (dtype, tensor)} of a safetensors directory, names exactly as in the files."""
    from safetensors import safe_open
    idx = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"] \
        if os.path.exists(os.path.join(path, "model.safetensors.index.json")) else None
    files = sorted(set(idx.values())) if idx else ["model.safetensors"]
    out = {}
    for fn in files:
        with safe_open(os.path.join(path, fn), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def saves(tmp_path_factory, tiny_tokenizer):
    """{dtype name: directory} of the authors' tiny model saved by their save_pretrained, with its tokenizer."""
    from megatron_p2t.cli import main
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    root = tmp_path_factory.mktemp("authors")
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(root / "parts")]) == 0
    tok = load_text_tokenizer(tiny_tokenizer)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m = authors.tiny(str(root / "parts" / "esm"), str(root / "parts" / "llama"),
                         placeholder=tok.convert_tokens_to_ids(PH), dtype=dtype)
        d = root / name
        m.save_pretrained(d, max_shard_size="300KB")
        tok.save_pretrained(d)
        out[name] = str(d)
    return root, out


def test_the_save_is_what_users_have(saves):
    _, dirs = saves
    stored = _stored(dirs["bfloat16"])
    assert os.path.exists(os.path.join(dirs["bfloat16"], "model.safetensors.index.json"))
    assert any(k.endswith("LayerNorm.gamma") for k in stored) and any("inv_freq" in k for k in stored)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype,tp,pp", [("float32", 1, 1), ("bfloat16", 2, 2)])
def test_import_then_export_gives_every_tensor_back_with_its_name_dtype_and_bits(saves, tmp_path, dtype, tp, pp):
    _, dirs = saves
    src = dirs[dtype]
    _run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}", "-m", "megatron_p2t",
          "import-p2tv2", src, "--out", str(tmp_path / "imported"), f"parallel.tensor={tp}",
          f"parallel.pipeline={pp}", f"model.dtype={dtype}"])
    _run(["-m", "megatron_p2t", "export", "--format", "p2tv2", "--checkpoint", str(tmp_path / "imported"),
          "--out", str(tmp_path / "back")])
    a, b = _stored(src), _stored(str(tmp_path / "back"))
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    assert json.load(open(os.path.join(src, "config.json"))) == json.load(open(tmp_path / "back" / "config.json"))


def test_generation_reads_the_save_directly_and_matches_the_authors_model(saves, tmp_path):
    from megatron_p2t.data import esm_alphabet
    from megatron_p2t.inference.model import Prot2TextForGeneration
    _, dirs = saves
    src = dirs["float32"]
    ours = Prot2TextForGeneration.from_pretrained(src)
    theirs = authors.P2TModel.from_pretrained(src).eval()
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    input_ids, attn, pids, pmask = ours.prompts([seq])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids, pids, pmask, attention_mask=attn),
                                   theirs(input_ids, pids, pmask, attention_mask=attn), rtol=1e-5, atol=1e-5)
    assert ours.pad_id == ours.tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert ours.eot_id == ours.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert esm_alphabet.decode(pids[0].tolist()) == seq
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">q1\n{seq}\n")
    _run(["-m", "megatron_p2t", "generate", "--model", dirs["bfloat16"], "--input", str(fasta), "--out",
          str(tmp_path / "p.jsonl"), "--max-new-tokens", "4"])
    assert json.loads(open(tmp_path / "p.jsonl").readline())["prediction"] is not None


def test_an_import_keeps_the_source_dropout_unless_the_config_sets_one(saves):
    from megatron_p2t.parts.assemble import hf_configs
    from megatron_p2t.config import load_config
    _, dirs = saves
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"), [f"model.p2tv2={dirs['float32']}"])
    assert hf_configs(cfg.model)[2].dropout == 0.3 and cfg.model.projector.dropout is None
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"),
                      [f"model.p2tv2={dirs['float32']}", "model.projector.dropout=0.05"])
    assert hf_configs(cfg.model)[2].dropout == 0.05


def test_the_authors_class_loads_a_fresh_export_with_nothing_missing_or_unexpected(saves, tmp_path, built_sample,
                                                                                 tiny_tokenizer):
    root, _ = saves
    out, _ = built_sample
    _run(["-m", "megatron_p2t", "instruct", "--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"),
          f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
          f"model.encoder_path={root}/parts/esm", f"model.llama={root}/parts/llama", "instruct.init_from=",
          "data.batch_size=4", "data.max_protein_residues=120", "train.steps=1", "train.save_every=1",
          f"train.save_dir={tmp_path}/run"])
    _run(["-m", "megatron_p2t", "export", "--format", "p2tv2", "--checkpoint", str(tmp_path / "run"), "--out",
          str(tmp_path / "export")])
    model, info = authors.P2TModel.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
