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
    cfg = load("tiny", f, ["optim.lr=2e-4", "data.source=folder:/some/where", "engine.bf16=false"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.batch_size == 4
    assert cfg.data.source == "folder:/some/where"
    assert cfg.engine.bf16 is False
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
    cfg = load("tiny")
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0
