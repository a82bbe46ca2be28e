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
    # a whole section from the command line is built as from YAML: its keys checked, the others at their defaults
    cfg = load_config(None, ["model.resampler={latents: 64, heads: 4}"])
    assert (cfg.model.resampler.latents, cfg.model.resampler.heads, cfg.model.resampler.depth) == (64, 4, 2)
    with pytest.raises(ConfigError, match=r"model.resampler.: unknown key\(s\) \['laten'\]"):
        load_config(None, ["model.resampler={laten: 64}"])


def test_parts_are_chosen_by_name_and_an_unknown_one_is_refused_with_the_choices():
    cfg = load_config(f"{ROOT}/configs/prot2text_v2.yaml")
    assert (cfg.model.encoder, cfg.model.connector, cfg.model.decoder) == ("esm2", "mlp", "llama")
    cfg = load_config(f"{ROOT}/configs/prot2text_v2.yaml", ["model.connector=resampler", "model.resampler.latents=64"])
    assert cfg.model.connector == "resampler" and cfg.model.resampler.latents == 64
    with pytest.raises(ConfigError, match=r"model.connector='perceiver'.*mlp2x_gelu.*resampler"):
        load_config(None, ["model.connector=perceiver"])
    with pytest.raises(ConfigError, match=r"model.decoder='mistral'.*llama"):
        load_config(None, ["model.decoder=mistral"])
    assert load_config(None, ["model.attention_kernel=torch_varlen"]).model.attention_kernel == "torch_varlen"
    with pytest.raises(ConfigError, match=r"model.attention_kernel='xformers'.*flash_attn.*torch_varlen.*sdpa"):
        load_config(None, ["model.attention_kernel=xformers"])


def _model(**kw):
    from megatron_p2t.config import ModelConfig
    return ModelConfig(**kw)


def test_a_protein_fills_as_many_prompt_slots_as_its_connector_gives():
    from megatron_p2t.models.parts_config import ResamplerConfig
    from megatron_p2t.parts import slots
    r = ResamplerConfig(latents=128)
    assert slots(_model(connector="mlp"), 350) == slots(_model(connector="mlp2x_gelu"), 350) == 352  # + <cls>, <eos>
    assert slots(_model(connector="resampler", resampler=r), 350) == 128
    assert slots(_model(connector="resampler", resampler=r), 12) == 128
    with pytest.raises(ValueError, match="choose one of"):
        slots(_model(connector="qformer"), 10)


def test_stage_1_follows_the_recipe_and_hscale_without_the_projector_is_refused():
    from megatron_p2t.parts import align_objective
    p2t, p2tv2 = load_config(f"{ROOT}/configs/protein2text.yaml"), load_config(f"{ROOT}/configs/prot2text_v2.yaml")
    assert align_objective(p2tv2.align.objective, p2tv2.model) == "hscale"
    assert align_objective(p2t.align.objective, p2t.model) == "feature"
    assert align_objective("auto", _model(connector="mlp2x_gelu")) == "feature"
    assert align_objective("feature", _model(connector="mlp")) == "feature"
    with pytest.raises(ConfigError, match=r"align.objective=hscale.*model.connector=resampler.*objective=feature"):
        load_config(f"{ROOT}/configs/protein2text.yaml", ["align.objective=hscale"])
    with pytest.raises(ConfigError, match=r"align.objective='contrastive'.*hscale.*feature"):
        load_config(None, ["align.objective=contrastive"])


def test_incompatible_parts_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"model.p2tv2=.*Prot2Text-V2 release.*model.connector=mlp"):
        load_config(f"{ROOT}/configs/protein2text.yaml", ["model.p2tv2=/models/Prot2Text-V2"])
    for bad in ("0", "-2", "2.5", "true"):
        with pytest.raises(ConfigError, match=r"model.resampler.latents=.*whole number"):
            load_config(f"{ROOT}/configs/protein2text.yaml", [f"model.resampler.latents={bad}"])


def test_more_prompt_slots_than_the_decoder_has_positions_are_refused():
    from megatron_p2t.models.parts_config import ResamplerConfig
    from megatron_p2t.parts import check_room
    check_room(_model(connector="resampler", resampler=ResamplerConfig(latents=128)), 1021, 512, 131072, "llama")
    with pytest.raises(ValueError, match=r"model.resampler.latents=4000 .*data.max_text_tokens=512.*4096 positions"):
        check_room(_model(connector="resampler", resampler=ResamplerConfig(latents=4000)), 1021, 512, 4096,
                   "/models/llama")
    with pytest.raises(ValueError, match=r"data.max_protein_residues=1021 .*model.connector=mlp"):
        check_room(_model(connector="mlp"), 1021, 512, 1024, "/models/llama")


def _run_dir(path, overrides, stage):
    import dataclasses
    import json
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "megatron_p2t.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(load_config(None, overrides)), "stage": stage}, f)
    return str(path)


def test_a_checkpoint_of_another_recipe_is_refused_naming_what_differs(tmp_path):
    from megatron_p2t.config import check_same_recipe
    hscale = _run_dir(tmp_path / "align", [], "align")               # Prot2Text-V2's stage 1
    p2t = load_config(f"{ROOT}/configs/protein2text.yaml")
    with pytest.raises(ConfigError, match=r"instruct.init_from=.*model.connector=mlp there, resampler here.*"
                                          r"model.esm_output_layer=-1 there, -2 here"):
        check_same_recipe(hscale, p2t, "instruct.init_from")
    check_same_recipe(hscale, load_config(f"{ROOT}/configs/prot2text_v2.yaml"), "instruct.init_from")
    feature = _run_dir(tmp_path / "p2t", ["model.connector=resampler", "model.esm_output_layer=-2"], "align-feature")
    os.makedirs(tmp_path / "p2t" / "step00000040")
    with pytest.raises(ConfigError, match=r"--resume=.*step00000040.*model.resampler.latents=128 there, 64 here"):
        check_same_recipe(str(tmp_path / "p2t" / "step00000040"),
                          load_config(f"{ROOT}/configs/protein2text.yaml", ["model.resampler.latents=64"]), "--resume")
    check_same_recipe(feature, p2t, "instruct.init_from")
    # a run saved before the parts had names (no encoder/connector/decoder keys) was Prot2Text-V2's
    import json
    old = json.load(open(os.path.join(hscale, "megatron_p2t.json")))
    for k in ("encoder", "connector", "decoder", "resampler"):
        del old["config"]["model"][k]
    json.dump(old, open(os.path.join(hscale, "megatron_p2t.json"), "w"))
    with pytest.raises(ConfigError, match="model.connector=mlp there, resampler here"):
        check_same_recipe(hscale, p2t, "instruct.init_from")
    check_same_recipe(str(tmp_path / "nothing_saved"), p2t, "--resume")   # nothing to compare with


def test_a_decoder_only_recipe_has_neither_encoder_nor_connector_and_builds_plain_prompts():
    from megatron_p2t.parts import align_objective, slots
    cfg = load_config(f"{ROOT}/configs/prollama.yaml")
    assert (cfg.model.encoder, cfg.model.connector, cfg.instruct.template) == ("none", "none", "plain")
    assert align_objective(cfg.align.objective, cfg.model) == "lm"
    assert slots(cfg.model, 500) == 0
    assert cfg.model.llm_lora.modules_to_save == ["embedding", "output_layer"]
    with pytest.raises(ConfigError, match=r"model.encoder=none with model.connector=mlp"):
        load_config(None, ["model.encoder=none"])
    with pytest.raises(ConfigError, match=r"set instruct.template=plain"):
        load_config(f"{ROOT}/configs/prollama.yaml", ["instruct.template=chat"])
    with pytest.raises(ConfigError, match=r"align.objective=lm with model.connector=mlp"):
        load_config(None, ["align.objective=lm"])
    with pytest.raises(ConfigError, match=r"modules_to_save=\['lm_head'\].*embedding and output_layer"):
        load_config(f"{ROOT}/configs/prollama.yaml", ["model.llm_lora.modules_to_save=[lm_head]"])


def test_structure_encoder_options_are_checked_and_its_loaders_read_coordinates():
    cfg = load_config(f"{ROOT}/configs/sepit.yaml")
    assert cfg.model.encoder == "esm2_structure" and cfg.data.structure and cfg.model.structure.kernels == 128
    assert not load_config(f"{ROOT}/configs/prot2text_v2.yaml").data.structure
    for bad, words in (("model.structure.kernels=0", "model.structure.kernels"),
                       ("model.structure.dropout=1.5", "model.structure.dropout"),
                       ("model.encoder=esm3", "esm2_structure")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            load_config(f"{ROOT}/configs/sepit.yaml", [bad])


def test_warmup_refuses_before_any_work():
    from megatron_p2t.training.stages.warmup_structure import check
    for overrides, words in ((["model.encoder=esm2"], "model.encoder=esm2_structure"),
                             (["warmup.text_encoder="], "warmup.text_encoder"),
                             (["warmup.text_encoder=x", "warmup.weights=[1.0, 1.0]"], "three non-negative")):
        with pytest.raises(ConfigError, match=words):
            check(load_config(f"{ROOT}/configs/sepit_tiny_cpu.yaml", overrides))


def test_moe_decoder_options_are_checked_before_any_work():
    cfg = load_config(f"{ROOT}/configs/sepit.yaml")
    assert cfg.model.decoder == "llama_moe" and cfg.model.moe.experts == 4 and cfg.parallel.expert == 4
    for bad, words in ((["parallel.expert=3"], "model.moe.experts=4 is not divisible by parallel.expert=3"),
                       (["model.moe.top_k=5"], "top_k=5 is more than model.moe.experts=4"),
                       (["model.moe.experts=1", "parallel.expert=1"], "at least 2 experts"),
                       (["model.moe.capacity_factor=0"], "capacity_factor=0"),
                       (["model.moe.dispatcher=flex"], "auto, alltoall or allgather"),
                       (["model.decoder=llama"], "parallel.expert=4 splits experts")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("(", r"\(")):
            load_config(f"{ROOT}/configs/sepit.yaml", bad)
    assert load_config(f"{ROOT}/configs/sepit.yaml", ["model.moe.capacity_factor=null"]).model.moe.capacity_factor \
        is None


def test_keys_renamed_for_neutral_part_names_still_load_and_say_the_new_name(tmp_path, capsys):
    """Configs, launch scripts and saved runs written before the rename keep loading: model.esm,
    model.projector_weights, model.freeze.projector and instruct.projector_lr are read as their new names."""
    import dataclasses
    import json

    from megatron_p2t import config as config_mod
    config_mod._told.clear()
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  esm: /models/esm\n  projector_weights: /models/proj\n"
                   "  freeze: {esm: true, projector: true, llm: true}\ninstruct:\n  projector_lr: 0.002\n")
    new = load_config(None, ["model.encoder_path=/models/esm", "model.connector_weights=/models/proj",
                             "model.freeze.connector=true", "instruct.connector_lr=0.002"])
    assert load_config(str(old)) == new
    err = capsys.readouterr().err
    for was, now in config_mod.RENAMED.items():
        assert f"config: {was} is now {now}" in err, err
    assert load_config(None, ["model.esm=/models/esm", "instruct.projector_lr=0.002",
                              "model.freeze={projector: true}"]).model.freeze.connector is True
    saved = json.loads(json.dumps(dataclasses.asdict(new)))          # a run's megatron_p2t.json from before
    saved["model"]["esm"] = saved["model"].pop("encoder_path")
    assert config_mod.config_from_dict(saved) == new
    with pytest.raises(ConfigError, match=r"model.esm and model.encoder_path both given"):
        config_mod.config_from_dict({"model": {"esm": "/a", "encoder_path": "/b"}})


def test_every_value_is_its_fields_type_or_refused_naming_key_value_and_type():
    """YAML 1.1 reads `1e-4` as a string: launch/slurm/instruct.sbatch's train.lr=1e-4 crashed after the model
    was built. Every YAML value and override is converted to its field's type, or refused when the config loads."""
    cfg = load_config(f"{ROOT}/configs/prot2text_v2.yaml", ["train.lr=1e-4", "model.llm_lora.alpha=32"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.model.llm_lora.alpha == 32
    for override, words in (("train.steps=ten", r"train.steps='ten': expected a whole number"),
                            ("data.batch_size=2.5", r"data.batch_size=2.5: expected a whole number or null"),
                            ("train.lr=fast", r"train.lr='fast': expected a number"),
                            ("instruct.pack=yes please", r"instruct.pack='yes please': expected true or false"),
                            ("train.adam_betas=[0.9, x]", r"train.adam_betas\[1\]='x': expected a number"),
                            ("model.llm_lora.targets=linear_qkv",
                             r"model.llm_lora.targets='linear_qkv': expected a list of strings")):
        with pytest.raises(ConfigError, match=words):
            load_config(f"{ROOT}/configs/prot2text_v2.yaml", [override])
    bad_yaml = {"train": {"steps": "ten"}}
    with pytest.raises(ConfigError, match=r"train.steps='ten'"):
        from megatron_p2t.config import config_from_dict
        config_from_dict(bad_yaml)


def test_values_outside_their_range_are_refused_when_the_config_loads():
    for override, words in (("train.steps=0", r"train.steps=0: at least 1"),
                            ("train.steps=-1", r"train.steps=-1: at least 1"),
                            ("train.save_every=0", r"train.save_every=0: at least 1"),
                            ("train.zero_stage=7", r"train.zero_stage=7: from 0 to 3"),
                            ("data.batch_size=-1", r"data.batch_size=-1: at least 1"),
                            ("parallel.tensor=0", r"parallel.tensor=0: at least 1"),
                            ("instruct.drop_name=1.5", r"instruct.drop_name=1.5: from 0 to 1")):
        with pytest.raises(ConfigError, match=words):
            load_config(f"{ROOT}/configs/prot2text_v2.yaml", [override])
    assert load_config(f"{ROOT}/configs/prot2text_v2.yaml", ["data.batch_size=", "data.max_tokens=16384"])
