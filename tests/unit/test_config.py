import json

import pytest

from vdvae_dist.config import available_presets, dumps, flatten, from_dict, load, to_dict


def test_every_preset_loads_and_round_trips():
    for name in available_presets():
        cfg = load(name)
        assert from_dict(json.loads(dumps(cfg))) == cfg
        assert cfg.preset == name


def test_overrides_are_typed_and_win_over_preset_and_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[optim]\nlr = 5e-4\nbatch_size = 4\n[model]\ndecoder = "1s1,4u4,4s1,8u2,8x3,8s1,16u2,16s2,32u2,32s2"\n')
    cfg = load("tiny", f, ["optim.lr=2e-4", "data.source=folder:/some/where", "engine.precision=fp32"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.batch_size == 4
    assert cfg.data.source == "folder:/some/where"
    assert cfg.engine.precision == "fp32"
    assert cfg.model.decoder == "1s1,4u4,4s1,8u2,8x3,8s1,16u2,16s2,32u2,32s2"


def test_yaml_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\noptim:\n  total_steps: 7\n")
    cfg = load(path=f)
    assert cfg.optim.total_steps == 7 and cfg.model.width == 32


@pytest.mark.parametrize("override, words", [
    (["optim.lrr=1"], ["optim.lrr", "allowed keys", "lr"]),
    (["nope.x=1"], ["nope", "allowed keys"]),
    (["optim.lr=-1"], ["optim.lr", "-1", "> 0"]),
    (["optim.ema_decay=1.5"], ["optim.ema_decay", "1.5", "[0, 1)"]),
    (["engine.zero_stage=4"], ["engine.zero_stage", "4", "0 | 1 | 2 | 3"]),
    (["optim.batch_size=abc"], ["optim.batch_size", "abc", "integer"]),
    (["model.decoder=1s1,4u4,4s1,8u2,8s1,16u2,16s2,32u2,32s2"], ["sends 2 skip(s) at 8 px", "1 entry there"]),
    (["model.encoder=32s2,32p3,16s2"], ["model.encoder token 2 '32p3'", "divide 32"]),
    (["model.encoder=32s2,16s2"], ["token 2 '16s2' runs at 16 px", "state is at 32 px"]),
    (["model.decoder=1s1,4u2"], ["token 2 '4u2'", "gives 2 px"]),
    (["model.encoder=32s2,32q2"], ["token 2 '32q2' is not understood"]),
    (["model.encoder=32s2,32p2,16s2,16x1"], ["ends in cells or pools after its last skip"]),
    (["model.channels=1"], ["model.channels", "dmol"]),
    (["data.resolution=30"], ["data.resolution", "30", "32"]),
    (["engine.offload_params=true"], ["engine.offload_params", "zero_stage = 3"]),
    (["scaling.workers=3"], ["optim.batch_size", "multiple of scaling.workers=3"]),
    (["optim.batch_size=8", "scaling.workers=2", "engine.micro_batch_size=3"],
     ["engine.micro_batch_size", "3", "divisor of optim.batch_size / scaling.workers = 4"]),
    (["engine.micro_batch_size=-1"], ["engine.micro_batch_size", "-1", ">= 0"]),
])
def test_bad_values_name_key_value_and_allowed(override, words):
    with pytest.raises(ValueError) as e:
        load("tiny", overrides=override)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="preset='cifar100' is unknown; allowed: .*cifar10"):
        load("cifar100")


def test_flatten_gives_dotted_string_params():
    flat = flatten(load("tiny"))
    assert flat["optim.lr"] == "0.001"
    assert flat["model.encoder"] == "32s2,32p2,16s2,16p2,8s2,8p2,4s1,4p4,1s1"
    assert to_dict(load("tiny"))["model"]["width"] == 32


def test_config_is_frozen():
    import dataclasses

    cfg = load("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


@pytest.mark.parametrize("name", available_presets())
def test_preset_round_trips_through_plain_data(name):
    cfg = load(name)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("override, message", [
    # unknown key: named, with the keys its section allows
    ("engine.zero_stag=1", "unknown key engine.zero_stag; allowed keys in engine: allow_untested_deepspeed, "
                           "compile, deepspeed, device, micro_batch_size, offload_optimizer, offload_params, precision, zero_stage"),
    # wrong types
    ("optim.lr=abc", "optim.lr='abc' is out of range; allowed: a number"),
    ("optim.batch_size=1.5", "optim.batch_size=1.5 is out of range; allowed: an integer"),
    ("engine.bf16=1", "engine.bf16=1 is out of range; allowed: true or false (engine.bf16 is replaced by "
                      "engine.precision = auto | fp32 | bf16)"),
    ("engine.bf16=yes", "engine.bf16='yes' is out of range; allowed: true or false (engine.bf16 is replaced by "
                        "engine.precision = auto | fp32 | bf16)"),
    ("engine.precision=fp16", "engine.precision='fp16' is out of range; allowed: auto | fp32 | bf16"),
    ("data.binarize=yes", "data.binarize='yes' is out of range; allowed: true or false"),
    ("data.source=123", "data.source=123 is out of range; allowed: a string"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] is out of range; allowed: a list of 2 values"),
    ("model.widths={x=3}", "model.widths.x='x' is out of range; allowed: an integer"),
    ("optim=3", "optim=3 is out of range; allowed: a table"),
    # bounds
    ("model.latent_channels=0", "model.latent_channels=0 is out of range; allowed: >= 1"),
    ("optim.eps=0", "optim.eps=0 is out of range; allowed: > 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas.1=1.0 is out of range; allowed: [0, 1)"),
    ("data.val_fraction=1", "data.val_fraction=1 is out of range; allowed: [0, 1)"),
    ("data.order=sorted", "data.order='sorted' is out of range; allowed: shuffled | sequential"),
    ("model.bottleneck=5", "model.bottleneck=5 is out of range; allowed: (0, 4]"),
    ("model.num_bits=9", "model.num_bits=9 is out of range; allowed: 1..8"),
    ("model.widths={16=0}", "model.widths.16=0 is out of range; allowed: >= 1"),
    ('train.output=""', "train.output='' is out of range; allowed: a non-empty string"),
    # choices
    ("engine.zero_stage=7", "engine.zero_stage=7 is out of range; allowed: 0 | 1 | 2 | 3"),
    ("model.likelihood=poisson", "model.likelihood='poisson' is out of range; allowed: dmol | bernoulli | gaussian"),
])
def test_field_errors_are_one_line_naming_key_value_and_allowed(override, message):
    with pytest.raises(ValueError) as e:
        load("tiny", overrides=[override])
    assert str(e.value) == message


def test_top_level_unknown_key_and_non_table_input():
    with pytest.raises(ValueError, match="^unknown key nope; allowed keys in the top level: data, engine, "):
        from_dict({"nope": 1})
    with pytest.raises(ValueError, match=r"^config=\[1\] is out of range; allowed: a table$"):
        from_dict([1])


def test_bool_words_in_any_case_and_numbers_from_text():
    cfg = load("tiny", overrides=["engine.bf16=False", "data.binarize=TRUE", "model.checkpoint_activations=true",
                                  "optim.total_steps=1e6", "optim.lr=2e-4"])
    assert (cfg.engine.precision, cfg.data.binarize, cfg.model.checkpoint_activations) == ("fp32", True, "full")
    assert cfg.optim.total_steps == 1_000_000 and isinstance(cfg.optim.total_steps, int)
    assert cfg.optim.lr == 2e-4
    assert from_dict({"engine": {"bf16": "false"}, "optim": {"batch_size": "16"}}).engine.precision == "fp32"


def test_strings_that_look_like_numbers_stay_strings(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[data]\nsource = "0042"\n[tracking]\nexperiment = "1e3"\n')
    cfg = load("tiny", f, ['train.output="2024"'])
    assert (cfg.data.source, cfg.tracking.experiment, cfg.train.output) == ("0042", "1e3", "2024")


def test_resolution_tables_and_lists_from_toml_and_yaml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[model.widths]\n32 = 16\n8 = 48\n[model.bottlenecks]\n4 = 0.5\n[optim]\nbetas = [0.8, 0.99]\n")
    cfg = load("tiny", f)
    assert cfg.model.widths == {32: 16, 8: 48} and cfg.model.bottlenecks == {4: 0.5}
    assert cfg.optim.betas == (0.8, 0.99)
    y = tmp_path / "run.yaml"
    y.write_text("preset: tiny\nmodel:\n  widths:\n    16: 24\n")
    assert load(path=y).model.widths == {16: 24}
    assert load("tiny", overrides=["model.widths={32 = 12, 16 = 7}"]).model.widths == {32: 12, 16: 7}
    with pytest.raises(ValueError, match=r"^model.widths=\{64: 3\} is out of range; allowed: resolutions among"):
        load("tiny", overrides=["model.widths={64 = 3}"])


@pytest.mark.parametrize("name", ["vdvae-ffhq256", "team.model_v2", "a b", ".hidden", "x" * 256,
                                  "a/b", "x:y", ".", "..", "../up", "  ", "x" * 257, "a//b"])
def test_register_model_takes_the_names_mlflow_registers(name):
    """tracking.register_model follows MLflow's registered-model name rule, so a bad name fails
    when the config loads instead of after training."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_accepts = len(name) <= 256  # the registry's name column holds 256 characters
    except MlflowException:
        mlflow_accepts = False
    if mlflow_accepts:
        assert load("tiny", overrides=[f"tracking.register_model={name}"]).tracking.register_model == name
    else:
        with pytest.raises(ValueError, match=r"^tracking\.register_model=.*registered-model name"):
            load("tiny", overrides=[f"tracking.register_model={name}"])
    assert load("tiny").tracking.register_model == ""  # registers nothing by default


def test_configs_with_the_old_bf16_switch_still_load():
    """engine.bf16 (before engine.precision): true, the old default, reads as auto."""
    assert from_dict({"engine": {"bf16": True}}).engine.precision == "auto"
    assert from_dict({"engine": {"bf16": False}}).engine.precision == "fp32"
    assert load("tiny").engine.precision == "auto"
    with pytest.raises(ValueError, match="engine.bf16 and engine.precision are both set"):
        from_dict({"engine": {"bf16": True, "precision": "bf16"}})


def test_checkpoint_activations_modes_and_the_former_boolean():
    for given, mode in [("false", "none"), ("true", "full"), ("selective", "selective"), ("full", "full")]:
        assert load("tiny", overrides=[f"model.checkpoint_activations={given}"]).model.checkpoint_activations == mode
    with pytest.raises(ValueError, match="model.checkpoint_activations='some'.*none.*selective.*full"):
        load("tiny", overrides=["model.checkpoint_activations=some"])


@pytest.mark.parametrize("overrides, message", [
    (["data.order=sequential", "data.shards=/x"], "data.order='sequential' is out of range; allowed: shuffled with "
                                                 "data.shards"),
    (["optim.decay_start=800000"], "optim.decay_start=800000 is out of range; allowed: [1, optim.decay_steps=750000]"),
    (["loss.kl_warmup_start=0", "loss.kl_warmup_steps=0"], "loss.kl_warmup_steps=0 is out of range; allowed: >= 1 "
                                                          "when loss.kl_warmup_start = 0"),
    (["data.val_fraction=0", "data.shards=/x"], "data.val_fraction=0.0 is out of range; allowed: (0, 1) with "
                                               "data.shards"),
    (["optim.warmup_steps=60000"], "optim.warmup_steps=60000 is out of range; allowed: [0, optim.decay_start=50000]"),
])
def test_replay_and_schedule_settings_are_refused_where_they_cannot_hold(overrides, message):
    with pytest.raises(ValueError) as e:
        load("cifar10", overrides=overrides)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("override, message", [
    ("serve.request_timeout_s=inf", "serve.request_timeout_s=inf is out of range; allowed: a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan is out of range; allowed: a finite number > 0"),
    ("serve.batch_wait_s=-inf", "serve.batch_wait_s=-inf is out of range; allowed: a finite number >= 0"),
    ("model.input_mean=inf", "model.input_mean=inf is out of range; allowed: a finite number"),
])
def test_no_number_may_be_inf_or_nan(override, message):
    with pytest.raises(ValueError) as e:
        load("tiny", overrides=[override])
    assert str(e.value) == message
