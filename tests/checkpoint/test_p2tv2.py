"""The published Prot2Text-V2 layout in and out: a tiny checkpoint in that layout, assembled by hand from tiny
HF EsmModel + LlamaForCausalLM + adapter weights, imported at TP=1 and TP=2 x PP=2 (logits, losses and gradients
against the HF parts), exported back bit for bit, and refused with the first mismatching key named."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def write_p2tv2(parts: str, out: str, placeholder: int = 250) -> str:
    """What `Esm2LlamaInstructForCausalLM.save_pretrained` writes, from the separate tiny HF parts: the
    composite config and esm_encoder.* / adapter.* / llama_decoder.* tensors in two safetensors shards."""
    from safetensors.torch import load_file, save_file
    from transformers import EsmModel, LlamaForCausalLM
    esm = EsmModel.from_pretrained(os.path.join(parts, "esm"), add_pooling_layer=False)
    llama = LlamaForCausalLM.from_pretrained(os.path.join(parts, "llama"))
    proj = load_file(os.path.join(parts, "projector", "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    inter, hid = proj["fc1.weight"].shape[0], proj["fc2.weight"].shape[0]
    tensors = {**{f"esm_encoder.{k}": v for k, v in esm.state_dict().items()},
               **{f"adapter.{k}": v for k, v in proj.items()},
               "adapter.ln1.weight": torch.randn(inter, generator=g), "adapter.ln1.bias": torch.randn(inter, generator=g),
               "adapter.ln2.weight": torch.randn(hid, generator=g), "adapter.ln2.bias": torch.randn(hid, generator=g),
               **{f"llama_decoder.{k}": v for k, v in llama.state_dict().items()}}
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    os.makedirs(out, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fn, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(out, fn), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
    esm_cfg, llama_cfg = esm.config.to_dict(), llama.config.to_dict()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_type": "esm2llama_instruct", "architectures": ["Esm2LlamaInstructForCausalLM"],
                   "esm_config": esm_cfg, "llama_config": llama_cfg, "placeholder_id": placeholder,
                   "adapter_config": {"model_type": "modality_adapter", "input_dim": esm.config.hidden_size,
                                      "intermediate_dim": inter, "output_dim": hid, "dropout_rate": 0.3}}, f,
                  indent=2)
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from megatron_p2t.models.tiny import make_all
    root = str(tmp_path_factory.mktemp("p2tv2"))
    make_all(os.path.join(root, "parts"))
    return root, write_p2tv2(os.path.join(root, "parts"), os.path.join(root, "published"))


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _import(src, out, tp, pp):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}",
                        "-m", "megatron_p2t", "import-p2tv2", src, "--out", out, f"parallel.tensor={tp}",
                        f"parallel.pipeline={pp}"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
    """The published tiny checkpoint imported at a layout, once per layout for the module (tests only read it)."""
    done = {}

    def get(tp, pp):
        if (tp, pp) not in done:
            out = str(tmp_path_factory.mktemp(f"imported_tp{tp}pp{pp}"))
            _import(published[1], out, tp, pp)
            done[tp, pp] = out
        return done[tp, pp]
    return get


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)], ids=["tp1pp1", "tp2pp2"])
def test_import_gives_the_hf_parts_logits_losses_and_gradients(published, imported, tmp_path, tp, pp):
    root, _ = published
    out = tmp_path / "ranks"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}",
                        os.path.join(ROOT, "tests", "models", "dist_model_main.py"), "--out", str(out),
                        f"--case=p2t:{tp}:{pp}", "--ckpt", os.path.join(root, "parts"),
                        "--sharded", imported(tp, pp)], env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.load(open(p)) for p in sorted(glob.glob(str(out / f"p2t-tp{tp}pp{pp}" / "rank*.json")))]
    assert len(ranks) == tp * pp
    for rk in ranks:
        if rk["pp_rank"] == pp - 1:
            assert rk["logit_diff"] <= 1e-5 and max(rk["loss_diff"]) <= 1e-5, rk
        assert rk["grads_checked"] == rk["params"] > 0 and rk["grad_diff"] <= 1e-5, rk


def test_import_at_tp2_pp2_then_export_is_bit_identical(published, imported, tmp_path):
    from megatron_p2t.checkpoint.hf_dir import HFDir
    _, src = published
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "export", "--format", "p2tv2", "--checkpoint",
                        imported(2, 2), "--out", str(tmp_path / "back")], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = HFDir(src), HFDir(str(tmp_path / "back"))
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
    assert open(os.path.join(src, "config.json")).read() == open(tmp_path / "back" / "config.json").read()


def _broken(src, tmp_path, edit_config=None, drop=None, rename=None):
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(src, d)
    if edit_config:
        c = json.load(open(d / "config.json"))
        edit_config(c)
        json.dump(c, open(d / "config.json", "w"))
    if drop or rename:
        idx = json.load(open(d / "model.safetensors.index.json"))
        if drop:
            del idx["weight_map"][drop]
        if rename:
            idx["weight_map"][rename[1]] = idx["weight_map"].pop(rename[0])
        json.dump(idx, open(d / "model.safetensors.index.json", "w"))
    return str(d)


@pytest.mark.parametrize("case,message", [
    ("model_type", "model_type is 'llama', expected 'esm2llama_instruct'"),
    ("adapter_dim", "adapter_config input_dim/output_dim = 47/64, expected esm_config.hidden_size/"
                    "llama_config.hidden_size = 48/64"),
    ("missing", "weight 'adapter.fc2.weight' is missing (expected shape [64, 32])"),
    ("renamed", "weight 'decoder.lm_head.weight' is outside the Prot2Text-V2 layout"),
])
def test_a_checkpoint_off_the_layout_names_the_first_mismatching_key(published, tmp_path, case, message):
    from megatron_p2t.checkpoint import p2tv2
    from megatron_p2t.checkpoint.hf_dir import CheckpointError
    _, src = published
    kw = {"model_type": dict(edit_config=lambda c: c.update(model_type="llama")),
          "adapter_dim": dict(edit_config=lambda c: c["adapter_config"].update(input_dim=47)),
          "missing": dict(drop="adapter.fc2.weight"),
          "renamed": dict(rename=("llama_decoder.lm_head.weight", "decoder.lm_head.weight"))}[case]
    with pytest.raises(CheckpointError) as e:
        p2tv2.check(_broken(src, tmp_path, **kw))
    assert message in str(e.value)
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "import-p2tv2", str(tmp_path / "broken"), "--out",
                        str(tmp_path / "o")], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_stage_2_continues_from_an_import_and_exports_the_published_layout(tmp_path, built_sample, tiny_tokenizer):
    """Prot2Text-V2 (here a tiny one with a real tokenizer) -> import -> instruct at TP=2 with fresh LoRA -> export
    in the published layout, whose logits (loaded with transformers alone) equal the megatron model's, and which
    generates."""
    from megatron_p2t.cli import main
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.inference.model import Prot2TextForGeneration
    from megatron_p2t.models.tiny import make_projector
    parts = tmp_path / "parts"
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(parts)]) == 0
    make_projector(str(parts / "projector"), esm_hidden=48, inter=32, out=64)
    tok = load_text_tokenizer(tiny_tokenizer)
    pub = write_p2tv2(str(parts), str(tmp_path / "published"),
                      placeholder=tok.convert_tokens_to_ids("<|reserved_special_token_1|>"))
    tok.save_pretrained(pub)
    _import(pub, str(tmp_path / "imported"), 1, 1)
    out, _ = built_sample
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "megatron_p2t", "instruct", "--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"),
                        f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
                        f"instruct.init_from={tmp_path}/imported", "parallel.tensor=2", "data.batch_size=6",
                        "data.max_protein_residues=200", "train.steps=3", "train.save_every=3", "train.lr=0.01",
                        f"train.save_dir={tmp_path}/run"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "export", "--format", "p2tv2", "--checkpoint",
                        str(tmp_path / "run"), "--out", str(tmp_path / "back"), "--verify"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] < 1e-4 and report["merged_lora_layers"] > 0, report
    a, b = HFDir(pub), HFDir(str(tmp_path / "back"))
    assert sorted(a.keys()) == sorted(b.keys())
    changed = {k.split(".")[0] for k in a.keys() if not torch.equal(a.get(k), b.get(k))}
    assert changed == {"adapter", "llama_decoder"}, changed   # LoRA merged and projector trained; ESM frozen
    model = Prot2TextForGeneration.from_pretrained(str(tmp_path / "back"))
    assert isinstance(model.generate(["MKTAYIAKQRQISFVKSHFSRQ"], max_new_tokens=4)[0], str)
