"""The decoder-only recipe (ProLLaMA) on the shared trainer: proteins written as text, stage 1 on packed
documents, stage 2 on Alpaca tasks from stage 1's export, generation checked as proteins, evaluation by MMseqs2."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _cli(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def families(tmp_path_factory, sample_records):
    """8 synthetic families (tests/synthetic.py): their train members as a UniRef50 FASTA built into language-model
    shards (one extra protein longer than a row), ProLLaMA's two tasks per protein as Alpaca shards (member 0 of
    each family valid, member 1 test), a tokenizer trained on English function text (as LLaMA's is, so proteins
    split into short pieces), and a tiny LLaMA."""
    from data_tools.build import BuildOptions, build
    from data_tools.clean import CleanOptions
    from data_tools.split import SplitOptions
    from megatron_p2t.data.text_tokenizer import build_llama3_style_tokenizer, load_text_tokenizer
    from megatron_p2t.models import tiny
    from tests.synthetic import family_members, write_family_tasks, write_uniref
    root = tmp_path_factory.mktemp("prollama")
    members = family_members(families=8, members=12, lengths=(40, 80))
    tasks = write_family_tasks(str(root / "src"), members)
    uniref = {}
    for split in ("train", "valid", "test"):
        uniref[split] = str(root / "src" / f"uniref_{split}.txt")
        with open(uniref[split], "w") as f:
            f.write("".join(f"UniRef50_{a}\n" for a in open(tasks[split]).read().split()))
    with open(uniref["train"], "a") as f:
        f.write("UniRef50_LONG00001\n")
    write_uniref(str(root / "src" / "uniref50.fasta.gz"), members, long_extra=900)
    build(BuildOptions(inputs=[str(root / "src" / "uniref50.fasta.gz")], out=str(root / "lm"), quiet=True,
                       samples_per_shard=32, processes=2, clean=CleanOptions(lm_text="Seq=<{sequence}>"),
                       split=SplitOptions(mode="lists", lists=uniref)))
    build(BuildOptions(inputs=[tasks["tasks"]], out=str(root / "tasks"), quiet=True, samples_per_shard=64,
                       processes=2, split=SplitOptions(mode="lists", lists={k: tasks[k] for k in
                                                                            ("train", "valid", "test")})))
    build_llama3_style_tokenizer((r.function for r in sample_records if r.function), str(root / "tok"),
                                 vocab_size=1024)
    vocab = len(load_text_tokenizer(str(root / "tok")))
    tiny.make_llama(str(root / "llama"), vocab=vocab + (-vocab) % 8, init_std=0.25)
    return root


def test_packed_documents_equal_each_alone_and_tp2_equals_tp1(families, tmp_path):
    """Stage 1 with the embedding and output layer trained fully (vocabulary-parallel under TP): a packed row's
    loss equals its documents run one at a time, and TP=2 equals TP=1 in the loss and every trainable gradient
    (LoRA A/B, embed_tokens, lm_head, compared in PEFT's layout) within 1e-6 in fp32 (the loss relative to its
    size). All 81 training documents
    in one batch, rows of 256 tokens, so the 900-residue protein arrives as a window of one."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "training", "dist_lm_main.py"), "--work", str(tmp_path),
                        f"data.manifest={families}/lm/manifest.json", f"data.text_tokenizer={families}/tok",
                        f"model.llama={families}/llama", "instruct.pack_length=256", "data.batch_size=81",
                        "data.shuffle_block=81"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for tp in (1, 2):
        for rank in range(2):
            res = json.load(open(tmp_path / f"tp{tp}_rank{rank}.json"))
            assert res["trainable"] == ["embedding", "lora", "output_layer"], res
            assert res["documents"] == 81 and res["rows"] < 30 and res["cut"] >= 1, res   # packed; the long one cut
            assert res["alone_loss_diff"] <= 1e-6 * res["loss"], res
            if tp == 2:
                # the loss relative to its size: one float32 ulp at a loss of 9 is 9.5e-7
                assert res["vs_tp1_loss"] <= 1e-6 * max(1.0, res["loss"]) and res["vs_tp1_grad"] <= 1e-6, res
                assert res["saved_compared"] == 2 and res["compared"] >= 30, res


def test_pretrain_tune_generate_by_family_and_classify_held_out_members(families, tmp_path):
    """Learnability: after stage 1 (100 steps) and stage 2 from its export (600 steps), sequences generated "by
    family" have their nearest training protein (MMseqs2) in the requested family in >= 80% of samples, and held-out
    members' families are named (greedy) in >= 90% of cases. Both exports load with transformers alone (logits equal
    the megatron model's), stage 1's PEFT adapter with its embed_tokens / lm_head equals the merged model, and
    generation resumes after a cut without redoing or losing rows."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    cfg = os.path.join(ROOT, "configs", "prollama_tiny_cpu.yaml")
    common = ["--config", cfg, f"data.text_tokenizer={families}/tok"]
    _cli("pretrain-lm", *common, f"data.manifest={families}/lm/manifest.json", f"model.llama={families}/llama",
         "train.steps=100", "train.save_every=100", "train.lr=0.005", f"train.save_dir={tmp_path}/pre")
    pre = json.loads(_cli("export", "--checkpoint", f"{tmp_path}/pre", "--out", f"{tmp_path}/pre_hf",
                          "--verify").stdout.strip().splitlines()[-1])
    assert pre["max_abs_logit_diff"] <= 1e-4, pre
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "pre_hf" / "llama")
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(families / "llama"), tmp_path / "pre_hf" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    assert json.load(open(tmp_path / "pre_hf" / "adapter" / "adapter_config.json"))["modules_to_save"] == [
        "embed_tokens", "lm_head"]
    _cli("instruct", *common, f"data.manifest={families}/tasks/manifest.json", f"model.llama={tmp_path}/pre_hf/llama",
         "model.llm_lora={r: 16, alpha: 32, dropout: 0.0, targets: [linear_qkv, linear_proj, linear_fc1, linear_fc2]}",
         "train.steps=600", "train.save_every=600", "train.lr=0.01", f"train.save_dir={tmp_path}/it")
    it = json.loads(_cli("export", "--checkpoint", f"{tmp_path}/it", "--out", f"{tmp_path}/hf",
                         "--verify").stdout.strip().splitlines()[-1])
    assert it["max_abs_logit_diff"] <= 1e-4, it
    gen, det = tmp_path / "gen.jsonl", tmp_path / "det.jsonl"
    _cli("generate-protein", "--model", f"{tmp_path}/hf", "--input", f"{families}/tasks/manifest.json", "--split",
         "test", "--tasks", "generate_by_superfamily", "--num-samples", "4", "--temperature", "0.5",
         "--max-new-tokens", "100", "--out", str(gen))
    # the rest in this process (each CLI start imports the whole stack)
    from megatron_p2t.evaluation import proteins as evaluate_proteins
    from megatron_p2t.inference import generate_protein
    rows = gen.read_text().splitlines()
    gen.write_text("\n".join(rows[:10]) + "\n" + rows[10][:25])                  # cut mid-row
    again = generate_protein.run(f"{tmp_path}/hf", str(gen), input_path=f"{families}/tasks/manifest.json",
                                 split="test", only_tasks=["generate_by_superfamily"], num_samples=4,
                                 temperature=0.5, max_new_tokens=100)
    assert again["samples"] == 32 and again["generated"] == 22, again
    assert gen.read_text().splitlines() == rows       # the rows redone are the ones the whole run wrote
    for split in ("valid", "test"):
        generate_protein.run(f"{tmp_path}/hf", str(det), input_path=f"{families}/tasks/manifest.json", split=split,
                             only_tasks=["determine_superfamily"], sample=False, max_new_tokens=30)
    evaluate_proteins.evaluate({"gen": str(gen), "det": str(det)}, f"{tmp_path}/report",
                               f"{families}/tasks/manifest.json")
    rep = json.load(open(tmp_path / "report" / "scores.json"))["systems"]
    g, u = rep["gen"]["generation"], rep["det"]["understanding"]
    assert g["n"] == 32 and g["valid_rate"] >= 0.8 and g["composition_js_bits"] < 0.05, g
    assert g["family_match"]["rate"] >= 0.8, g
    assert len(g["novelty"]["identities"]) == round(g["valid_rate"] * 32), g
    assert u["n"] == 16 and u["accuracy"] >= 0.9, u
    assert (tmp_path / "report" / "identity_hist.png").stat().st_size > 0
