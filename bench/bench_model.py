"""Model benchmarks on CPU:
1. forward+backward step time and peak memory per rank, TP=1 vs TP=2 vs PP=2, small config, same total threads;
2. peak memory per rank while importing a multi-file HF checkpoint at TP=2 (each rank reads only its slices);
3. parameters and weight memory per GPU for ESM-2-3B + LLaMA-3.1-8B at 8xH100 layouts (exact counts from the
   real configs; the counting is checked against instantiated models in part 1).

    python bench/bench_model.py
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def small_configs(root):
    """ESM-2-8M-shaped encoder + a 4-layer LLaMA-3-shaped decoder (GQA, rope scaling), saved as HF dirs."""
    import torch
    from transformers import EsmConfig, EsmForMaskedLM, LlamaConfig, LlamaForCausalLM
    from safetensors.torch import save_file
    torch.manual_seed(0)
    esm = EsmConfig(vocab_size=33, hidden_size=320, num_hidden_layers=6, num_attention_heads=20,
                    intermediate_size=1280, position_embedding_type="rotary", token_dropout=True,
                    emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, max_position_embeddings=1026)
    EsmForMaskedLM(esm).save_pretrained(os.path.join(root, "esm"))
    llama = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=False,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    LlamaForCausalLM(llama).save_pretrained(os.path.join(root, "llama"))
    os.makedirs(os.path.join(root, "projector"), exist_ok=True)
    save_file({"fc1.weight": torch.randn(256, 320) * 0.05, "fc1.bias": torch.zeros(256),
               "fc2.weight": torch.randn(512, 256) * 0.05, "fc2.bias": torch.zeros(512)},
              os.path.join(root, "projector", "model.safetensors"), metadata={"format": "pt"})


def worker_step(a):
    import torch
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    layout = state.initialize(ParallelConfig(tensor=a.tp, pipeline=a.pp))
    from transformers import EsmConfig, LlamaConfig
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.checkpoint.slicing import copy_into
    from megatron_p2t.checkpoint.p2t_hf import megatron_tensors
    from megatron_p2t.data import esm_alphabet
    from megatron_p2t.models import p2t
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.models.projector import ProjectorConfig
    from megatron_p2t.parallel import pipeline
    lc = LlamaConfig.from_pretrained(os.path.join(a.ckpt, "llama"))
    ec = EsmConfig.from_pretrained(os.path.join(a.ckpt, "esm"))
    pc = ProjectorConfig(input_dim=320, intermediate_dim=256, output_dim=512, dropout=0.0)
    base = rss_mb()
    from megatron_p2t import parts
    from megatron_p2t.config import ModelConfig
    mcfg = ModelConfig(freeze=p2t.FreezeConfig(esm=True, connector=False, llm=False))
    model = p2t.Prot2TextModel(mcfg, parts.of(mcfg), ESMConfig.from_hf(ec), lc, pc, placeholder_id=8000,
                               pre_process=layout.first_stage, post_process=layout.last_stage, layout=layout)
    src = {k: HFDir(os.path.join(a.ckpt, k)) for k in ("esm", "llama", "projector")}
    tpr = layout.tp_rank
    copy_into(model, megatron_tensors(model, src["esm"], src["llama"], src["projector"], lc, pc, tpr, a.tp), "")
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(a.micro):
        L = 200
        ids = torch.randint(0, 7000, (a.mb, a.seq), generator=g)
        ids[:, 4:4 + L + 2] = 8000
        pids = torch.randint(4, 24, (a.mb, L + 2), generator=g)
        pids[:, 0], pids[:, -1] = esm_alphabet.CLS, esm_alphabet.EOS
        mbs.append({"input_ids": ids, "position_ids": torch.arange(a.seq)[None].expand(a.mb, -1).contiguous(),
                    "protein_ids": pids, "protein_mask": torch.ones(a.mb, L + 2, dtype=torch.bool),
                    "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(a.mb, a.seq)})
    times = []
    for i in range(a.steps + 1):
        torch.distributed.barrier()
        t = time.perf_counter()
        pipeline.run(model, mbs)
        torch.distributed.barrier()
        if i:
            times.append(time.perf_counter() - t)
        for p in model.parameters():
            p.grad = None
    numel = sum(p.numel() for p in model.parameters())
    out = {"rank": torch.distributed.get_rank(), "tp": a.tp, "pp": a.pp, "stage": layout.pp_rank,
           "step_s": statistics.median(times), "peak_rss_mb": rss_mb(), "rss_over_start_mb": rss_mb() - base,
           "params": numel}
    with open(os.path.join(a.out, f"step_{a.tp}_{a.pp}_{out['rank']}.json"), "w") as f:
        json.dump(out, f)
    state.destroy()


def worker_import(a):
    import torch
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    layout = state.initialize(ParallelConfig(tensor=a.tp))
    from transformers import LlamaConfig
    from megatron_p2t.checkpoint import llama_hf
    from megatron_p2t.checkpoint.hf_dir import HFDir
    from megatron_p2t.models import llama
    cfg = LlamaConfig.from_pretrained(a.ckpt)
    m = llama.build(cfg, layout=layout)
    after_build = rss_mb()
    t = time.perf_counter()
    llama_hf.load_into(m, HFDir(a.ckpt), cfg, layout.tp_rank, a.tp)
    secs = time.perf_counter() - t
    own = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
    with open(os.path.join(a.out, f"import_{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"rank": torch.distributed.get_rank(), "own_mb": own, "peak_rise_mb": rss_mb() - after_build,
                   "seconds": secs}, f)
    state.destroy()


def launch(nproc, *args, threads):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        os.path.abspath(__file__), *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["step", "import"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ckpt")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--seq", type=int, default=384)
    a = ap.parse_args()
    if a.worker == "step":
        return worker_step(a)
    if a.worker == "import":
        return worker_import(a)

    from bench.common import machine
    from bench.param_count import ESM2_3B, LLAMA31_8B, PROJ, stage_params
    tmp = tempfile.mkdtemp(prefix="p2t-model-bench-")
    small_configs(os.path.join(tmp, "ck"))
    print(f"# model benchmark -- {machine()}\n")
    print(f"## 1. forward+backward, ESM-2-8M-shaped encoder (frozen) + projector + 4-layer LLaMA-3-shaped "
          f"decoder (h=512, GQA 8/2, vocab 8192), {a.micro} microbatches x {a.mb} x {a.seq} tokens "
          f"(protein 202 tokens each); 2 threads in total per layout; median of {a.steps} steps\n")
    print("| layout | processes | step s | tokens/s | vs TP=1 | peak RSS per rank (MB) | params per rank |")
    print("|---|---|---|---|---|---|---|")
    base = None
    results = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        n = tp * pp
        launch(n, "--worker", "step", "--tp", str(tp), "--pp", str(pp), "--ckpt", os.path.join(tmp, "ck"),
               "--out", tmp, "--steps", str(a.steps), "--micro", str(a.micro), "--mb", str(a.mb), "--seq",
               str(a.seq), threads=2 // n)
        rs = [json.load(open(os.path.join(tmp, f"step_{tp}_{pp}_{r}.json"))) for r in range(n)]
        step = max(r["step_s"] for r in rs)
        base = base or step
        results[(tp, pp)] = rs
        toks = a.micro * a.mb * a.seq / step
        print(f"| TP={tp} PP={pp} | {n} | {step:.2f} | {toks:,.0f} | {base / step:.2f}x | "
              f"{' / '.join('%.0f' % r['peak_rss_mb'] for r in rs)} | {' / '.join(format(r['params'], ',') for r in rs)} |")
    # the counting formula, checked against the instantiated small model
    esm_s = {"layers": 6, "hidden": 320, "ffn": 1280}
    ll_s = {"layers": 4, "hidden": 512, "heads": 8, "kv": 2, "ffn": 1408, "vocab": 8192}
    for (tp, pp), rs in results.items():
        for r in rs:
            assert stage_params(esm_s, ll_s, {"intermediate": 256}, tp, pp, r["stage"]) == r["params"], (tp, pp, r)
    print("\n(parameter counts per rank above equal the counting formula used in part 3)\n")

    # 2. import memory on a multi-file checkpoint
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    big = os.path.join(tmp, "big")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("cpu"):
        LlamaForCausalLM(cfg).save_pretrained(big, max_shard_size="50MB")
    files = [f for f in os.listdir(big) if f.endswith(".safetensors")]
    total = sum(os.path.getsize(os.path.join(big, f)) for f in files) / 2**20
    launch(2, "--worker", "import", "--tp", "2", "--ckpt", big, "--out", tmp, threads=1)
    rs = [json.load(open(os.path.join(tmp, f"import_{r}.json"))) for r in range(2)]
    print(f"## 2. importing a {total:.0f} MB LLaMA checkpoint in {len(files)} safetensors files at TP=2\n")
    print("| rank | its shard (MB) | peak RSS rise while importing (MB) | seconds |")
    print("|---|---|---|---|")
    for r in rs:
        print(f"| {r['rank']} | {r['own_mb']:.0f} | {r['peak_rise_mb']:.0f} | {r['seconds']:.2f} |")
    print(f"\n(the whole checkpoint is {total:.0f} MB: a rank that loaded it whole would rise by at least that)\n")

    # 3. ESM-2-3B + LLaMA-3.1-8B on 8xH100 nodes
    print("## 3. ESM-2-3B + projector + LLaMA-3.1-8B: parameters per GPU (largest stage), from the real configs\n")
    print("| layout (TP x PP x DP on 8 GPUs) | params per GPU | bf16 weights GB | + full-training grads (bf16) and "
          "Adam fp32 (master + 2 moments) with ZeRO-1 over DP, GB |")
    print("|---|---|---|---|")
    for tp, pp in ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4)):
        dp = 8 // (tp * pp)
        n = max(stage_params(ESM2_3B, LLAMA31_8B, PROJ, tp, pp, s) for s in range(pp))
        w = n * 2 / 1e9
        full = (n * 2 + n * 2 + n * 12 / dp) / 1e9
        print(f"| {tp} x {pp} x {dp} | {n / 1e9:.2f} B | {w:.1f} | {full:.1f} |")
    total = stage_params(ESM2_3B, LLAMA31_8B, PROJ, 1, 1, 0)
    print(f"\nwhole model: {total / 1e9:.2f} B parameters. Activations are not included (see the planner, later).")


if __name__ == "__main__":
    main()
