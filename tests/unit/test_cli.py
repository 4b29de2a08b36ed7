import json
import subprocess
import sys

from vdvae_dist.cli import main


def test_config_prints_the_resolved_config(capsys):
    assert main(["config", "--preset", "tiny", "--set", "optim.lr=2e-4"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 2e-4 and cfg["model"]["width"] == 32


def test_bad_input_is_one_clear_line_and_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "vdvae_dist.cli", "config", "--preset", "tiny", "--set",
                          "optim.lr=-3"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "vdvae-dist: error: optim.lr=-3 is out of range; allowed: > 0"


def test_params_lists_every_preset(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert "cifar10" in out and "56,598,692" in out and "208,873,444" in out


def test_register_flag_is_the_config_field_on_train_and_launch(capsys):
    """--register NAME sets tracking.register_model, checked when the config loads (before
    any training or Ray start-up)."""
    for command in ("train", "launch"):
        assert main([command, "--preset", "tiny", "--register", "team/model"]) == 2
        err = capsys.readouterr().err
        assert "tracking.register_model='team/model' is out of range" in err, err


def test_train_refuses_an_object_store_output_instead_of_writing_a_local_s3_folder(tmp_path, monkeypatch, capsys):
    from vdvae_dist.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "tiny", "--set", "train.output=s3://bucket/run", "--set", "optim.total_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "train.output='s3://bucket/run' is out of range" in err and "file://" in err
    assert not any(tmp_path.iterdir())  # nothing written here (no ./s3:/bucket/run)
