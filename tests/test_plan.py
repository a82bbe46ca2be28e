"""The capacity planner: parameter counts of the real architectures, layout rules, and its memory model against
the measured training peak of small configs on CPU (within 20%)."""
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_p2t.config import load_config
from megatron_p2t.plan import DEVICES, KNOWN, arch_of, layouts
from tests.conftest import ROOT

GIB = 1024 ** 3


def test_parameter_counts_match_the_published_models():
    llama, esm = KNOWN["Llama-3.1-8B-Instruct"], KNOWN["esm2_t36_3B_UR50D"]
    n_llama = llama.layers * (llama.layer_matrix_params() + llama.layer_norm_params()) + 2 * 128256 * 4096 + 4096
    assert n_llama == 8_030_261_248                      # Llama-3.1-8B's published parameter count
    n_esm = esm.layers * (esm.layer_matrix_params() + esm.layer_norm_params()) + 33 * 2560
    assert abs(n_esm - 2.84e9) / 2.84e9 < 0.01           # ESM-2 3B: 2.8B (with LM head, contact head: 2.84B)


def test_production_layouts_for_one_node_and_their_rules(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"))
    plans = {p.tp: p for p in layouts(cfg, "instruct", 8, DEVICES["h100-80gb"])}
    assert sorted(plans) == [1, 2, 4, 8] and all(p.dp * p.tp == 8 for p in plans.values())
    # frozen bf16 weights: ESM 3B + LLaMA 8B = ~21 GiB at TP=1, halved by TP=2
    assert 19 < plans[1].memory["frozen_weights"] / GIB < 22
    assert plans[2].memory["frozen_weights"] == pytest.approx(plans[1].memory["frozen_weights"] / 2, rel=0.01)
    assert plans[2].total < plans[1].total and plans[2].samples_s < plans[1].samples_s * 1.01
    s1 = {p.tp: p for p in layouts(cfg, "align", 16, DEVICES["h100-80gb"])}
    assert s1[1].fits and s1[1].memory["frozen_weights"] / GIB < 6   # text cache: no decoder in stage 1
    cfg.train.global_batch = 48   # 8 per GPU: only DP=2 (accumulating 3) and DP=1 (6) divide it
    assert [(p.tp, p.global_batch) for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])] == [(4, 48), (8, 48)]
    cfg.model.llama = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere: no config.json there and not a known checkpoint"):
        arch_of(cfg.model.llama)


def test_cli_prints_a_table_per_stage():
    r = subprocess.run([sys.executable, "-m", "megatron_p2t", "plan", "--config", "configs/prot2text_v2.yaml",
                        "--gpus", "16", "--gpu", "h100-80gb"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "16 x h100-80gb, stage align" in r.stdout and "16 x h100-80gb, stage instruct" in r.stdout
    assert r.stdout.count("| 2 | 1 | 8 |") == 2
    # stage 2 at TP <= 2 keeps too much: the table says what recompute makes of it (stage 1 fits, and has no hint)
    assert r.stdout.count("Not fitting") == 1
    assert re.search(r"with model.recompute.granularity=full: TP=1 4\d\.\d GiB, TP=2 2\d\.\d GiB, for 1\.\d\dx the "
                     r"step time", r.stdout), r.stdout


@pytest.fixture(scope="module")
def mid_models(tmp_path_factory, tiny_tokenizer):
    """Models big enough that their memory, not the interpreter's, is what is measured."""
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    from megatron_p2t.models import tiny
    root = tmp_path_factory.mktemp("mid")
    vocab = len(load_text_tokenizer(tiny_tokenizer))
    tiny.make_llama(str(root / "llama"), vocab=vocab + (-vocab) % 8, layers=6, hidden=768, max_shard_size="2GB")
    tiny.make_esm(str(root / "esm"), layers=8, hidden=768)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [("align", []), ("align", ["model.esm_lora.r=8"]),
                                         ("align", ["model.esm_lora.r=8", "model.recompute.encoder=true"]),
                                         ("instruct", []), ("instruct", ["model.recompute.granularity=full"])],
                         ids=["align", "align-esm-lora", "align-esm-lora-recompute", "instruct", "instruct-recompute"])
def test_memory_model_within_20_percent_of_the_measured_cpu_peak(stage, extra, mid_models, built_sample,
                                                                 tiny_tokenizer, tmp_path):
    out, _ = built_sample
    cfg = "align_tiny_cpu.yaml" if stage == "align" else "instruct_tiny_cpu.yaml"
    ov = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}",
          f"model.encoder_path={mid_models}/esm", f"model.llama={mid_models}/llama", "data.batch_size=4",
          "data.max_protein_residues=254", "data.max_text_tokens=64", "model.projector.intermediate_dim=512",
          "train.steps=2", "train.save_every=1000", "train.tensorboard=false", f"train.save_dir={tmp_path}/run",
          "align.use_text_cache=false", "align.text_layer=3", "instruct.init_from=", "instruct.pack_length=512",
          *extra]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "plan_measure_main.py"), stage, "--config",
                        os.path.join(ROOT, "configs", cfg), *ov], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                                             DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536",
                                             MALLOC_TRIM_THRESHOLD_="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    measured, predicted = res["measured"], res["predicted_total"]
    print(f"{stage} {extra}: measured {measured / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB")  # docs/
    assert abs(predicted - measured) / measured < 0.2, res


def test_the_connector_decides_the_prompt_length_and_its_own_parameters():
    """Protein2Text's 128 latents in place of L + 2 = 1023 slots per protein: fewer activations and FLOPs in stage
    2; the resampler's own parameters (at the ESM width, plus mlp2x_gelu) replace the projector's."""
    from megatron_p2t.plan import connector_params
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"))
    mlp = {p.tp: p for p in layouts(cfg, "instruct", 8, DEVICES["h100-80gb"])}
    cfg.model.connector = "resampler"
    res = {p.tp: p for p in layouts(cfg, "instruct", 8, DEVICES["h100-80gb"])}
    assert res[1].memory["activations"] < 0.5 * mlp[1].memory["activations"]
    assert res[1].flops_per_step < 0.6 * mlp[1].flops_per_step   # ESM still reads all 1,023 tokens
    d, h = 2560, 4096
    one_layer = 3 * 2 * d + 3 * d * 512 + 512 * d + 2 * d * d * 2
    assert connector_params(cfg.model, d, h, 1) == 128 * d + 3 * d + 2 * one_layer + d * h + h + h * h + h
    assert connector_params(cfg.model, d, h, 2) < connector_params(cfg.model, d, h, 1)


def test_feature_alignment_is_planned_as_a_decoder_step_and_layouts_follow_the_resampler_heads():
    """Stage 1 of Protein2Text backpropagates through the whole frozen decoder (no LoRA): its activations and
    FLOPs are stage 2's without adapters, not H-SCALE's pooled projector; a TP size that does not divide the
    resampler's heads is not offered."""
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"))
    cfg.model.connector = "resampler"
    feature = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    tuned = {p.tp: p for p in layouts(cfg, "instruct", 8, DEVICES["h100-80gb"])}
    cfg.model.connector, cfg.align.use_text_cache = "mlp", False
    hscale = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    assert feature[1].memory["activations"] > 5 * hscale[1].memory["activations"]
    assert feature[1].memory["trainable_weights"] < tuned[1].memory["trainable_weights"]      # no adapters
    assert feature[1].flops_per_step == tuned[1].flops_per_step                              # same tokens
    cfg.model.connector, cfg.model.resampler.heads = "resampler", 6
    assert sorted(p.tp for p in layouts(cfg, "instruct", 8, DEVICES["h100-80gb"])) == [1, 2]


def test_a_decoder_only_recipe_plans_no_encoder_and_its_trained_embedding_and_output_layer():
    """ProLLaMA: no ESM tower or connector; stage 1 trains LoRA r128 plus the embedding and output layer (2 x 32000 x
    4096 parameters, split by TP) on documents bounded by a row."""
    cfg = load_config(os.path.join(ROOT, "configs", "prollama.yaml"))
    lm = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    assert sorted(lm) == [1, 2, 4, 8]                     # no encoder heads to divide
    saved = 2 * 32000 * 4096 * 2                          # bf16 bytes, TP=1
    assert lm[1].memory["trainable_weights"] > saved and lm[2].memory["trainable_weights"] < lm[1].memory[
        "trainable_weights"]
    assert lm[1].memory["frozen_weights"] / GIB == pytest.approx(12.55, abs=0.05)   # LLaMA-2-7B alone, bf16
    assert lm[1].fits


def test_the_structure_encoder_adds_its_bias_to_the_plan():
    """model.encoder=esm2_structure: the [heads, L, L] bias kept per protein, one checkpointed chunk of the kernel
    expansion, and the bias's own trained parameters; a smaller chunk plans less. Trained (the default), the bias
    enters every ESM layer's attention, so the gradient runs back through all of them and each keeps its
    activations, as ESM's own LoRA makes it in stage 1; frozen, only the bias itself is held."""
    from megatron_p2t.plan import esm_layer_activations
    cfg = load_config(os.path.join(ROOT, "configs", "prot2text_v2.yaml"))
    plain = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    cfg.model.encoder = "esm2_structure"
    biased = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    cfg.model.freeze.structure = True
    frozen = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    L, heads, b = cfg.data.max_protein_residues + 2, 40, cfg.data.batch_size
    bias = b * heads * L * L * 2                          # bf16, TP=1
    chunk = 5 * b * 128 * L * 128 * 4
    extra = frozen[1].memory["activations"] - plain[1].memory["activations"]
    assert bias < extra < bias + chunk + 1
    esm = arch_of(cfg.model.encoder_path)
    layers = b * L * esm.layers * esm_layer_activations(esm, cfg.model.esm_lora, 2, 1)
    assert layers + 2 * bias < biased[1].memory["activations"] < layers + 2 * bias + chunk + plain[1].total
    assert biased[1].flops_per_step > 1.5 * plain[1].flops_per_step   # input gradients through every ESM layer
    assert biased[2].memory["activations"] < biased[1].memory["activations"] / 1.35  # heads and widths over TP
    assert biased[1].memory["optimizer"] > plain[1].memory["optimizer"]
    cfg.model.freeze.structure = False
    cfg.model.structure.chunk = 16
    small = {p.tp: p for p in layouts(cfg, "align", 8, DEVICES["h100-80gb"])}
    assert small[1].memory["activations"] < biased[1].memory["activations"]


def test_moe_decoder_planned_with_its_experts():
    """Stage 2 with SEPIT's decoder: four experts per layer trained fully, the dense MLPs no longer frozen; expert
    parallelism divides the experts, and their optimizer state is partitioned over the ranks holding the same ones."""
    dense = load_config(os.path.join(ROOT, "configs", "sepit.yaml"), ["model.decoder=llama", "parallel.expert=1"])
    moe1 = load_config(os.path.join(ROOT, "configs", "sepit.yaml"), ["parallel.expert=1"])
    moe4 = load_config(os.path.join(ROOT, "configs", "sepit.yaml"))
    h100 = DEVICES["h100-80gb"]
    d, m1, m4 = ({p.tp: p for p in layouts(c, "instruct", 8, h100)} for c in (dense, moe1, moe4))
    mlp = 32 * 3 * 4096 * 14336      # LLaMA-3.1-8B's MLP parameters
    assert d[2].memory["frozen_weights"] - m1[2].memory["frozen_weights"] == pytest.approx(mlp / 2 * 2, rel=1e-6)
    experts = 32 * (4 * 3 * 4096 * 14336 / 2 + 4 * 4096)          # per TP=2 rank, bf16 weights below
    assert m1[2].memory["trainable_weights"] - d[2].memory["trainable_weights"] > experts * 2 * 0.9
    assert sorted(m4) == [1, 2] and all(p.ep == 4 for p in m4.values())   # TP=4, 8 leave DP < 4
    assert m4[2].memory["trainable_weights"] < m1[2].memory["trainable_weights"] / 3
    assert m4[2].step_s > d[2].step_s                             # router + tp copies of each token's expert
    assert "| EP |" in __import__("megatron_p2t.plan", fromlist=["table"]).table(list(m4.values()), "instruct",
                                                                              "h100-80gb", 8, 0.4)
    # two nodes at TP=2: DP 8, each expert on 2 ranks, which split its optimizer state (the rest: ZeRO over DP 8)
    two = {p.tp: p for p in layouts(moe4, "instruct", 16, h100)}
    assert two[2].memory["optimizer"] == pytest.approx(m4[2].memory["optimizer"] / 2, rel=1e-9)
    assert two[2].memory["gradients"] == pytest.approx(m4[2].memory["gradients"], rel=1e-9)   # experts' stay whole


def test_recompute_trades_activations_for_a_second_forward():
    """Stage 2 of the production config at batch 8: kept activations do not fit an H100 at TP <= 2; recomputing
    every layer keeps each layer's input (plus one layer's activations) and runs the decoder layers' forward again,
    a third more FLOPs for frozen weights (forward 2N, input gradients 2N, recompute 2N)."""
    path = os.path.join(ROOT, "configs", "prot2text_v2.yaml")
    h100 = DEVICES["h100-80gb"]
    keep = {p.tp: p for p in layouts(load_config(path), "instruct", 8, h100)}
    full = {p.tp: p for p in layouts(load_config(path, ["model.recompute.granularity=full"]), "instruct", 8, h100)}
    block = {p.tp: p for p in layouts(load_config(path, ["model.recompute.granularity=full",
                                                         "model.recompute.method=block",
                                                         "model.recompute.num_layers=16"]), "instruct", 8, h100)}
    assert not keep[1].fits and not keep[2].fits and full[1].fits and full[2].fits and block[2].fits
    for tp in (1, 2):
        a, f, bl = (x[tp].memory["activations"] for x in (keep, full, block))
        assert f < a / 5 and f < bl < a
        assert 1.2 < full[tp].flops_per_step / keep[tp].flops_per_step < 1.5
        assert keep[tp].flops_per_step < block[tp].flops_per_step < full[tp].flops_per_step
    assert full[2].recompute == "full, uniform x 1" and keep[2].recompute == ""
    assert "recomputed: full, uniform x 1" in __import__("megatron_p2t.plan", fromlist=["table"]).table(
        list(full.values()), "instruct", "h100-80gb", 8, 0.4)
    assert layouts(load_config(path, ["model.recompute.granularity=full"]), "align", 8, h100)[0].recompute == ""


def test_esm_adapters_keep_every_esm_layer_where_they_train():
    """model.esm_lora trains in stage 1 (the paper's variant): the gradient runs back through every ESM layer,
    which keeps its activations, and takes input gradients there; stage 2 carries the adapters frozen. SDPA keeps
    no [heads, L, L] scores (megatron's unfused attention kept two per layer: 87 GiB of activations at TP=1, batch
    8), so the production batch fits one H100 at TP=1."""
    path = os.path.join(ROOT, "configs", "prot2text_v2.yaml")
    h100 = DEVICES["h100-80gb"]
    plain, lora = (layouts(load_config(path, ov), stage, 8, h100)[0] for stage in ("align",)
                   for ov in ([], ["model.esm_lora.r=8"]))
    assert lora.memory["activations"] > 10 * plain.memory["activations"] and lora.fits
    assert lora.memory["activations"] / GIB == pytest.approx(20.0, abs=0.1)
    assert lora.flops_per_step > 1.9 * plain.flops_per_step
    plain2, lora2 = (layouts(load_config(path, ov), "instruct", 8, h100)[0] for ov in ([], ["model.esm_lora.r=8"]))
    assert lora2.memory["activations"] == plain2.memory["activations"]



def test_recomputing_esm_keeps_its_layer_inputs_where_gradients_run_through_it():
    """model.recompute.encoder: stage 1 with ESM's LoRA (batch 32) keeps each ESM layer's input and one layer's
    activations instead of every layer's, for ESM's forward once more; where no gradient runs through ESM it
    changes nothing, and the planner's hint under a table that does not fit names it."""
    from megatron_p2t.plan import run
    path = os.path.join(ROOT, "configs", "prot2text_v2.yaml")
    h100 = DEVICES["h100-80gb"]
    keep, again = (layouts(load_config(path, ["model.esm_lora.r=8", "data.batch_size=32", *ov]), "align", 8, h100)[0]
                   for ov in ([], ["model.recompute.encoder=true"]))
    assert not keep.fits and again.fits and again.memory["activations"] < keep.memory["activations"] / 8
    assert 1.3 < again.flops_per_step / keep.flops_per_step < 1.6 and again.recompute == "ESM"
    plain, plain_again = (layouts(load_config(path, ov), "align", 8, h100)[0]
                          for ov in ([], ["model.recompute.encoder=true"]))
    assert plain_again.memory == plain.memory and plain_again.recompute == ""
    out = run(load_config(path, ["model.esm_lora.r=8", "data.batch_size=32"]), 8, "h100-80gb", ["align"])
    assert re.search(r"with model.recompute.encoder=true: TP=1 19\.\d GiB, for 1\.\d\dx", out), out
