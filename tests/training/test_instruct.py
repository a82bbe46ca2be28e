"""Stage 2 on the shared sample's shards with tiny random models (CPU, gloo)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, built_sample, tiny_tokenizer):
    from megatron_p2t.cli import main
    from megatron_p2t.models.tiny import make_projector
    root = tmp_path_factory.mktemp("instruct")
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(root / "tiny")]) == 0
    make_projector(str(root / "proj"), esm_hidden=48, inter=64, out=64)  # identical weights at every layout
    out, _ = built_sample
    overrides = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
                 f"model.encoder_path={root}/tiny/esm", f"model.llama={root}/tiny/llama", "instruct.init_from=",
                 f"model.connector_weights={root}/proj", "data.batch_size=6", "data.max_protein_residues=200"]
    return root, overrides


def _released_connector(out, latents):
    """Protein2Text's connector at the tiny widths (ESM 48 -> LLaMA 64), saved under its released names."""
    import torch
    from safetensors.torch import save_file
    from tests.models.resampler_reference import Connector
    torch.manual_seed(7)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in Connector(48, 64, latents=latents).released_state_dict().items()},
              os.path.join(out, "model.safetensors"))
    return str(out)


def _torchrun(nproc, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.parametrize("connector", ["mlp", "resampler"])
def test_packed_equals_padded_and_tp2_equals_tp1(setup, tmp_path, connector):
    """Prot2Text-V2's projector (one prompt slot per ESM token) and Protein2Text's resampler (a fixed number of
    latents per protein, weights in the released names) on the same stage-2 path."""
    root, ov = setup
    if connector == "resampler":
        ov = [o for o in ov if not o.startswith("model.connector_weights=")] + [
            "model.connector=resampler", "model.esm_output_layer=-2", "model.resampler.latents=8",
            "model.resampler.heads=4", "model.resampler.head_dim=8",
            f"model.connector_weights={_released_connector(tmp_path / 'connector', latents=8)}"]
    script = os.path.join(ROOT, "tests", "training", "dist_instruct_main.py")
    for tp in (1, 2):
        _torchrun(tp, script, "--tp", str(tp), "--work", str(tmp_path), *ov)
        for rank in range(tp):
            r = json.load(open(tmp_path / f"tp{tp}_rank{rank}.json"))
            assert r["rows"][0] == 6 and r["rows"][1] < 6, r           # packing really packed
            assert r["trainable"] == ["connector", "lora"], r       # every connector sits at `connector`
            assert r["loss_diff"] <= 1e-6 * r["loss"] and r["grad_diff"] <= 1e-5, r   # fp32, relative
            if tp == 2:
                assert r["vs_tp1_loss"] <= 1e-6 and r["vs_tp1_grad"] <= 1e-5 and r["compared"] > 25, r


def test_pp2_trains_like_pp1_resumes_exactly_and_exports(setup, tmp_path):
    """Pipeline-parallel stage 2 (1F1B over 3 packed micro-batches of varying shape per step, ZeRO-2 over the
    data-parallel group of one), each stage's decoder layers recomputed in backward (model.recompute), gives one
    process's losses and adapters (kept activations); a resume from its step-2 checkpoint continues bit-exactly;
    its checkpoint exports (two processes, one per stage) and verifies."""
    root, ov = setup
    cfg = os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml")
    common = [*ov, "model.llm_lora.dropout=0.0", "instruct.pack=true", "instruct.pack_length=256",
              "train.grad_accum=3", "train.steps=4", "train.save_every=2", "train.keep_last=2", "train.zero_stage=2"]
    runs = {}
    for pp in (1, 2):
        d = tmp_path / f"pp{pp}"
        recompute = ["model.recompute.granularity=full"] if pp == 2 else []
        _torchrun(pp, "-m", "megatron_p2t", "instruct", "--config", cfg, *common, *recompute,
                  f"parallel.pipeline={pp}", f"train.save_dir={d}")
        runs[pp] = ([json.loads(l)["loss"] for l in open(d / "train_log.jsonl")], json.load(open(d / "summary.json")))
    (l1, s1), (l2, s2) = runs[1], runs[2]
    from megatron_p2t.config import saved_run
    assert saved_run(str(tmp_path / "pp2"))["config"]["model"]["recompute"]["granularity"] == "full"
    assert len(l1) == len(l2) == 4 and l1[-1] < l1[0], (l1, l2)
    assert max(abs(a - b) / a for a, b in zip(l1, l2)) <= 1e-5, (l1, l2)
    assert abs(s1["eval"]["loss"] - s2["eval"]["loss"]) <= 1e-5 * s1["eval"]["loss"], (s1, s2)

    (tmp_path / "pp2" / "latest").write_text("step00000002")
    _torchrun(2, "-m", "megatron_p2t", "instruct", "--config", cfg, *common, "parallel.pipeline=2",
              "model.recompute.granularity=full", f"train.save_dir={tmp_path}/pp2", "--resume", "auto")
    again = [json.loads(l)["loss"] for l in open(tmp_path / "pp2" / "train_log.jsonl")]
    assert again == l2, (again, l2)

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    adapters = {}
    for pp in (1, 2):
        r = subprocess.run([sys.executable, "-m", "megatron_p2t", "export", "--checkpoint", str(tmp_path / f"pp{pp}"),
                            "--out", str(tmp_path / f"hf{pp}"), *(["--verify"] if pp == 2 else [])], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert report["pipeline_parallel"] == pp and report["merged_lora_layers"] == 4 * 4, report
        from safetensors.torch import load_file
        adapters[pp] = load_file(tmp_path / f"hf{pp}" / "adapter" / "adapter_model.safetensors")
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert adapters[1].keys() == adapters[2].keys() and len(adapters[1]) == 4 * 7 * 2
    for k, a in adapters[1].items():
        assert float((a - adapters[2][k]).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max())), k


def test_tp2_run_exports_verified_with_a_peft_adapter_and_generates_resumably(setup, tmp_path):
    """instruct at TP=2 -> export (which starts its own 2 processes) -> the exported directory's logits equal the
    megatron model's; PEFT on the original LLaMA equals the merged LLaMA; generate resumes without duplicates."""
    root, ov = setup
    _torchrun(2, "-m", "megatron_p2t", "instruct", "--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"),
              *ov, "parallel.tensor=2", "train.steps=3", "train.save_every=3", f"train.save_dir={tmp_path}/run")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "export", "--checkpoint", str(tmp_path / "run"),
                        "--out", str(tmp_path / "hf"), "--verify"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["tensor_parallel"] == 2 and report["merged_lora_layers"] == 4 * 4
    assert report["max_abs_logit_diff"] <= 1e-4, report

    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    ids = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "llama")
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "tiny" / "llama"),
                                     tmp_path / "hf" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)

    from megatron_p2t.inference.model import Prot2TextForGeneration
    m = Prot2TextForGeneration.from_pretrained(str(tmp_path / "hf"))
    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSSILPFTPPIVKRL", "MAADIFAKHHHHKLLQPWGEE"]
    together = m.generate(seqs, max_new_tokens=10)
    assert together == [m.generate([s], max_new_tokens=10)[0] for s in seqs]  # left padding changes nothing
    # an export made before model.connector existed: its megatron_p2t.json has none of the connector's keys
    import shutil
    shutil.copytree(tmp_path / "hf", tmp_path / "hf_before")
    info = json.load(open(tmp_path / "hf" / "megatron_p2t.json"))
    assert info["connector"] == "mlp" and info["esm_final_norm"] is True
    before = ("format", "placeholder_token", "system_prompt", "missing_fields", "esm_output_layer",
              "max_protein_residues", "checkpoint", "lora_merged_layers")        # export.py's keys at c090c33
    with open(tmp_path / "hf_before" / "megatron_p2t.json", "w") as f:
        json.dump({k: info[k] for k in before}, f)
    assert Prot2TextForGeneration.from_pretrained(str(tmp_path / "hf_before")).generate(
        seqs, max_new_tokens=10) == together

    from megatron_p2t.inference import generate
    out = tmp_path / "preds.jsonl"
    manifest = [o.split("=", 1)[1] for o in ov if o.startswith("data.manifest=")][0]
    first = generate.run(str(tmp_path / "hf"), manifest, str(out), split="test", max_new_tokens=6)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:10]) + "\n" + lines[10][:15])     # interrupted mid-row
    again = generate.run(str(tmp_path / "hf"), manifest, str(out), split="test", max_new_tokens=6)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert first["generated"] == 44 and again == {"proteins": 44, "generated": 34, "skipped_already_done": 10}
    assert sorted(r["accession"] for r in rows) == sorted(json.loads(l)["accession"] for l in lines)
    assert all("reference" in r for r in rows)
    fasta = tmp_path / "new.fasta"
    fasta.write_text(">sp|P12345|KIN_HUMAN Kinase X OS=Homo sapiens OX=9606\nMKTAYIAKQRQISFVKSHFSRQ\n"
                     ">Q1\nMSSILPFTPPIVKRL\n")
    g = generate.run(str(tmp_path / "hf"), str(fasta), str(tmp_path / "new.jsonl"), max_new_tokens=4)
    rows = [json.loads(l) for l in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert g["generated"] == 2 and {r["accession"] for r in rows} == {"P12345", "Q1"}
    assert all("reference" not in r for r in rows)


def test_stage2_learns_when_the_text_is_in_the_sequence(tiny_tokenizer, sample_records, tmp_path):
    """Learnability: tests/synthetic.py's families with a short text each; after stage 2 the exported model
    writes the right text for held-out members (new sequences) -- it reads the protein. The tiny LLaMA is
    initialised wider than HF's 0.02 so its frozen output layer can make confident predictions at all."""
    from data_tools.build import BuildOptions, build
    from data_tools.split import SplitOptions
    from megatron_p2t.evaluation import text as evaluation
    from megatron_p2t.inference import generate
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    from tests.synthetic import write_families
    texts = list(dict.fromkeys(" ".join(r.function.split()[:6]).rstrip(".,;") + "." for r in sample_records
                               if r.function))
    src = write_families(str(tmp_path / "src"), texts, families=16, lengths=(30, 60))
    build(BuildOptions(inputs=[src["fasta"]], annotations=src["annotations"], out=str(tmp_path / "data"),
                       quiet=True, samples_per_shard=64, processes=2,
                       split=SplitOptions(mode="lists", lists={k: src[k] for k in ("train", "valid", "test")})))
    vocab = len(load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(tmp_path / "llama"), vocab=vocab + (-vocab) % 8, init_std=0.25)
    tiny.make_esm(str(tmp_path / "esm"))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), DS_ACCELERATOR="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "megatron_p2t", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=900)
    r = run("instruct", "--config", os.path.join(ROOT, "configs", "instruct_tiny_cpu.yaml"),
            f"data.manifest={tmp_path}/data/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
            f"model.encoder_path={tmp_path}/esm", f"model.llama={tmp_path}/llama", "instruct.init_from=",
            "train.steps=200", "train.lr=0.01", "model.llm_lora.r=16", "model.llm_lora.dropout=0.0",
            "train.save_every=200", f"train.save_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("export", "--checkpoint", f"{tmp_path}/run", "--out", f"{tmp_path}/hf")
    assert r.returncode == 0, r.stderr[-3000:]
    generate.run(f"{tmp_path}/hf", f"{tmp_path}/data/manifest.json", f"{tmp_path}/preds.jsonl", split="test",
                 max_new_tokens=24)
    rows = list(evaluation.read_predictions(f"{tmp_path}/preds.jsonl").values())
    assert len(rows) == 16
    em = evaluation.scores([x["prediction"] for x in rows], [x["reference"] for x in rows])["exact_match"]
    assert em >= 90.0, rows
