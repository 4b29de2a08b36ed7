"""benchmarks/official_step.py (model_step.py --reference PATH): its checks and its .cfg reading,
without the official sources (the benchmark itself needs a checkout given by the user)."""
import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("official_step", BENCH / "official_step.py")
official_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official_step)

CFG = """[run]
name = cifar10_baseline
num_gpus = 2

[data]
dataset_source = 'cifar-10'
input_kernel_size = (1, 1)

[model]
# a comment
up_strides = [1] * 3 + [2]
gradient_smoothing_beta = 0.6931472

[optimizer]
gradient_skip_threshold = 800.

[train]
batch_size = 32
"""


def _checkout(root: Path) -> Path:
    (root / "efficient_vdvae_torch" / "model").mkdir(parents=True)
    (root / "efficient_vdvae_torch" / "model" / "def_model.py").write_text("")
    (root / "egs").mkdir()
    (root / "egs" / "cifar10_baseline.cfg").write_text(CFG)
    return root


def test_a_path_without_the_official_code_is_named(tmp_path):
    with pytest.raises(ValueError, match="not an Efficient-VDVAE checkout"):
        official_step.config_path(str(tmp_path), "cifar10")


def test_a_preset_without_an_official_config_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"--preset tiny .*cifar10.*mnist"):
        official_step.config_path(str(_checkout(tmp_path)), "tiny")


def test_the_checkout_root_or_its_torch_folder_and_a_missing_cfg(tmp_path):
    root = _checkout(tmp_path)
    cfg = root / "egs" / "cifar10_baseline.cfg"
    assert official_step.config_path(str(root), "cifar10") == cfg
    assert official_step.config_path(str(root / "efficient_vdvae_torch"), "cifar10") == cfg
    with pytest.raises(ValueError, match="binarized_mnist_baseline.cfg is missing"):
        official_step.config_path(str(root), "mnist")


def test_hparams_cfg_gets_the_benchmark_values_and_reads_like_the_official_library(tmp_path, monkeypatch):
    cfg = _checkout(tmp_path / "src") / "egs" / "cifar10_baseline.cfg"
    monkeypatch.chdir(tmp_path)
    official_step._write_hparams(cfg, 8)
    written = configparser.ConfigParser(interpolation=None)
    written.read(tmp_path / "hparams.cfg")
    assert (written["train"]["batch_size"], written["run"]["num_gpus"]) == ("8", "1")
    hp = official_step._HParams(".", name="test-official-step")
    assert official_step._HParams.get_hparams_by_name("test-official-step") is hp
    assert hp.run.name == "cifar10_baseline" and hp.data.dataset_source == "cifar-10"
    assert hp.model.up_strides == [1, 1, 1, 2] and hp.data.input_kernel_size == (1, 1)
    assert hp.train.batch_size == 8 and hp.optimizer.gradient_skip_threshold == 1e30


def test_model_step_rejects_a_bad_reference_before_timing_anything(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "model_step.py"), "--reference", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not an Efficient-VDVAE checkout" in out.stderr
