"""The megatron-core model against the HF reference at every parallel layout that runs here (gloo, CPU).

Start-up (torch, megatron-core, transformers, the gloo rendezvous) costs more than most checks, so the checks of
one world size run one after another in a single launch (dist_model_main.py rebuilds megatron's groups between
them); each test reads its own case's per-rank results."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from megatron_p2t.models.tiny import make_all

pytestmark = pytest.mark.slow

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TP_CHECKS = ["esm", "text", "esm_lora", "llama_lora", "resampler", "esm_structure"]  # tensor parallel only, at TP=1 and TP=2
CASES = [(what, tp, pp) for tp, pp in LAYOUTS for what in ("llama", "p2t", "p2t_resampler")] + \
        [(what, tp, 1) for tp in (1, 2) for what in TP_CHECKS]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    make_all(root)
    return root


@pytest.fixture(scope="module")
def launched(tmp_path_factory, ckpt, sample_records):
    """One torchrun launch per world size, run on first use; maps world size -> its output dir (or its error)."""
    seqs = tmp_path_factory.mktemp("seqs") / "seqs.txt"
    seqs.write_text("\n".join([r.sequence for r in sample_records if 40 <= len(r.sequence) <= 160][:6]))
    done = {}

    def get(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            cases = [f"--case={w}:{t}:{p}" for w, t, p in CASES if t * p == world]
            env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={world}", os.path.join(ROOT, "tests", "models",
                                                                          "dist_model_main.py"),
                                "--out", str(out), "--ckpt", ckpt, "--sequences", str(seqs), *cases],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
            done[world] = (out, None if r.returncode == 0 else r.stdout[-2000:] + r.stderr[-4000:])
        return done[world]
    return get


def _ranks(launched, what, tp, pp=1):
    out, error = launched(tp * pp)
    assert error is None, error
    ranks = [json.load(open(p)) for p in sorted(glob.glob(str(out / f"{what}-tp{tp}pp{pp}" / "rank*.json")))]
    assert len(ranks) == tp * pp
    return ranks


@pytest.mark.parametrize("what", ["llama", "p2t"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_matches_hf_reference(launched, what, tp, pp):
    ranks = _ranks(launched, what, tp, pp)
    last = [r for r in ranks if r["pp_rank"] == pp - 1]
    for r in last:
        assert r["logit_diff"] <= 1e-5, r
        assert max(r["loss_diff"]) <= 1e-5, r
    for r in ranks:
        assert r["grads_checked"] == r["params"] > 0, "every parameter's gradient is compared"
        assert r["grad_diff"] <= 1e-5, r
    assert sum(r["params"] for r in ranks if r["tp_rank"] == 0) >= (27 if what == "llama" else 70)
    if what == "p2t":
        assert [r["trainable"] for r in ranks if r["pp_rank"] == 0][0] == ["connector"]
        assert all(r["trainable"] == [] for r in ranks if r["pp_rank"] > 0)


@pytest.mark.parametrize("tp", [1, 2])
def test_esm_matches_hf_on_real_sequences(launched, tp):
    for r in _ranks(launched, "esm", tp):
        assert r["padded"] > 0 and max(r["diffs"].values()) <= 1e-5, r


@pytest.mark.parametrize("tp", [1, 2])
def test_structure_encoder_matches_its_reference_and_is_esm2_without_coordinates(launched, tp):
    """SEPIT's distance bias (Gaussian kernels -> MLP -> a bias per head, summed features on the embeddings), rows
    chunked by 5, against a plain-torch reference fed to HF's EsmModel as its additive attention mask: encoder
    outputs and every structure gradient within 1e-5 (heads split at TP=2). Without coordinates -- none given, all
    masked, or one protein of a mixed batch -- the outputs equal ESM-2's bit for bit (the mixed batch runs padded,
    so its plain row equals ESM-2's padded path; ESM-2 without padding agrees with that within 1e-5 and gives zero
    at padding)."""
    for r in _ranks(launched, "esm_structure", tp):
        assert r["structure_effect"] > 0.1, "the structure must change the output for the comparison to mean anything"
        assert r["out_diff"] <= 1e-5 and r["bias_diff"] <= 1e-5 * max(1.0, r["bias_scale"]), r
        assert r["grads"] == 8 and r["grad_scale"] > 1e-3 and r["grad_diff"] <= 1e-5, r
        assert r["no_coords_equal"] and r["none_known_equal"] and r["mixed_row_equal"], r
        assert r["unpadded_diff"] <= 1e-5 and r["unpadded_zero_at_padding"], r


@pytest.mark.parametrize("tp", [1, 2])
def test_text_side_pools_layer_k_like_hf(launched, tp):
    for r in _ranks(launched, "text", tp):
        assert set(r["diffs"]) == {f"{k}, {how}" for k in (1, 2, 3) for how in ("unpadded", "padded")}, r
        assert max(r["diffs"].values()) <= 1e-5, r
        assert r["last_layer_refused"]


@pytest.mark.parametrize("tp", [1, 2])
def test_esm_lora_matches_peft_and_merges(launched, tp):
    for r in _ranks(launched, "esm_lora", tp):
        assert r["lora_effect"] > 1e-2, "the adapter must change the output for the comparison to mean anything"
        assert r["out_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5, r
        assert r["grads"] == 4 * 3 and r["trainable"] == ["lora_A", "lora_B"] and r["merged"] == 2 * 3
        assert r["merge_diff"] <= 1e-5, r


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_lora_matches_peft_exports_its_layout_and_merges(launched, tp):
    ranks = _ranks(launched, "llama_lora", tp)
    layers, projections = 4, 7
    for r in ranks:
        assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-5, r
        assert r["grads"] == layers * 4 * 2 and r["trainable"] == ["lora_A", "lora_B"]
        assert r["export_diff"] == 0 and r["merge_diff"] <= 1e-5, r
    exported = set().union(*(r["exported"] for r in ranks))
    assert len(exported) == layers * projections * 2


@pytest.mark.parametrize("tp", [1, 2])
def test_resampler_matches_the_released_connector_and_masks_padding(launched, tp):
    """Protein2Text's Perceiver resampler + mlp2x_gelu, loaded from the released names, on a padded batch of three
    protein lengths: outputs and gradients equal the plain-torch reference run on each protein alone (fp32), at
    TP=1 and with heads and feed-forward split over TP=2; and mlp2x_gelu alone. The shards reassemble to the
    released tensors, which the exported reader (hf/connector.py) runs batched to the same outputs."""
    for r in _ranks(launched, "resampler", tp):
        assert r["out_shape"] == [3, 6, 64] and r["mask_all_true"], r
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]) and r["alone_diff"] <= 1e-5, r
        assert r["input_grad_diff"] <= 1e-5 and r["padding_grad"] == 0.0, r
        assert r["grads_checked"] == r["params"] == 4 + 2 * 11 + 4, r
        assert r["grad_diff"] <= 1e-5, r
        # LLaVA's mlp2x_gelu alone (model.connector=mlp2x_gelu), the same mm_projector tensors
        assert r["mlp2x_gelu_params"] == 4, r
        assert r["mlp2x_gelu_out_diff"] <= 1e-5 and r["mlp2x_gelu_grad_diff"] <= 1e-5, r
        # every rank's checkpoint shard back to the released tensors whole (what instruct.init_from reads at
        # any layout), and the exported reader (megatron_p2t/hf/connector.py, batched) on the padded batch
        assert r["whole_names"] and r["whole_diff"] == 0.0, r
        assert r["reader_mask"] and r["reader_diff"] <= 1e-5 * max(1.0, r["out_scale"]), r


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_protein2text_matches_its_reference_at_every_layout(launched, tp, pp):
    """The whole Protein2Text model (ESM layer -2 -> resampler + mlp2x_gelu -> LLaMA, 6 latents per protein in the
    prompt) against HF ESM + the released connector run per protein + HF LLaMA: logits, losses and every
    gradient at TP=1, TP=2, PP=2 and TP=2 x PP=2."""
    ranks = _ranks(launched, "p2t_resampler", tp, pp)
    for r in ranks:
        if r["pp_rank"] == pp - 1:
            assert r["logit_diff"] <= 1e-5 and max(r["loss_diff"]) <= 1e-5, r
        assert r["grads_checked"] == r["params"] > 0 and r["grad_diff"] <= 1e-5, r
    assert [r["trainable"] for r in ranks if r["pp_rank"] == 0][0] == ["connector"]
