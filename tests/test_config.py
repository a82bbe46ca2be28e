import os

import pytest

from megatron_p2t.config import ConfigError, load_config
from tests.conftest import ROOT


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(f"{ROOT}/configs/sample_cpu.yaml", ["data.max_tokens=4096", "data.num_workers=0",
                                                           "data.split=valid", "data.text_tokenizer="])
    assert cfg.data.max_tokens == 4096 and cfg.data.num_workers == 0 and cfg.data.split == "valid"
    assert cfg.data.text_tokenizer is None and cfg.data.batch_size is None and cfg.data.max_protein_residues == 1021


def test_production_config_loads():
    cfg = load_config(f"{ROOT}/configs/prot2text_v2.yaml")
    assert cfg.data.batch_size == 8 and cfg.data.max_text_tokens == 512


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(f"{ROOT}/configs") if n.endswith(".yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(f"{ROOT}/configs/{name}")
    assert cfg.data.manifest


def test_unknown_keys_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no key 'nope'"):
        load_config(None, ["data.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["data.batch_size"])


def test_parts_are_chosen_by_name_and_an_unknown_one_is_refused_with_the_choices():
    cfg = load_config(f"{ROOT}/configs/prot2text_v2.yaml")
    assert (cfg.model.encoder, cfg.model.connector, cfg.model.decoder) == ("esm2", "mlp", "llama")
    cfg = load_config(f"{ROOT}/configs/prot2text_v2.yaml", ["model.connector=resampler", "model.resampler.latents=64"])
    assert cfg.model.connector == "resampler" and cfg.model.resampler.latents == 64
    with pytest.raises(ConfigError, match=r"model.connector='perceiver'.*mlp2x_gelu.*resampler"):
        load_config(None, ["model.connector=perceiver"])
    with pytest.raises(ConfigError, match=r"model.decoder='mistral'.*llama"):
        load_config(None, ["model.decoder=mistral"])


def test_a_protein_fills_as_many_prompt_slots_as_its_connector_gives():
    from megatron_p2t.models.parts_config import ResamplerConfig, protein_slots
    r = ResamplerConfig(latents=128)
    assert protein_slots("mlp", r, 350) == protein_slots("mlp2x_gelu", r, 350) == 352   # residues + <cls> + <eos>
    assert protein_slots("resampler", r, 350) == protein_slots("resampler", r, 12) == 128
    with pytest.raises(ValueError, match="choose one of"):
        protein_slots("qformer", r, 10)
