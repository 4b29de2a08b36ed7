"""The package as users install it: the wheel, with the dependencies pyproject.toml declares
(held to requirements.txt's pins), in a fresh virtual environment, through the same
cluster/install.sh as `make install` and the Dockerfile. Everything then runs from a folder
outside the checkout, so nothing of the repository can stand in for a missing file or
dependency of the wheel."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EVD_MNIST = REPO / "tests" / "reference" / "evd-mnist"


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "2"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv holding only torch, installed as cluster/install.sh's first step does. The
    logged-model test below adds the model's own requirements to it and runs first (file
    order); `installed` then puts the wheel into the same venv, which saves one torch install
    and the shared dependencies (about a minute)."""
    venv = tmp_path_factory.mktemp("package") / "venv"
    _run([str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", str(venv)], cwd=venv.parent)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", os.environ.get("TORCH_SPEC", "torch==2.13.0")],
         cwd=venv.parent, timeout=900)
    return venv


@pytest.fixture(scope="module")
def installed(fresh_venv, tmp_path_factory):
    """(venv, wheel, workdir): the wheel built from this checkout, installed with its
    [serve] extra by cluster/install.sh into the venv above."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(REPO)], cwd=tmp)
    wheel = next((tmp / "dist").glob("vdvae_dist-*.whl"))
    _run([str(REPO / "cluster" / "install.sh"), str(fresh_venv), f"{wheel}[serve]"], cwd=tmp, timeout=900)
    work = tmp / "work"
    work.mkdir()
    return fresh_venv, wheel, work


def test_the_wheel_holds_the_package_data_and_no_tests():
    """Cheap check on the wheel's file list (built here without installing anything)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp,
                        str(REPO)], check=True, capture_output=True)
        names = zipfile.ZipFile(next(Path(tmp).glob("*.whl"))).namelist()
    assert "vdvae_dist/config/presets/tiny.toml" in names
    assert "vdvae_dist/tracking/pyfunc_entry.py" in names
    assert not [n for n in names if n.startswith(("tests/", "jobs/", "benchmarks/"))]
    metadata = next(n for n in names if n.endswith("METADATA"))
    assert metadata


@pytest.mark.integration
@pytest.mark.slow
def test_the_logged_model_loads_and_predicts_in_a_fresh_environment_with_its_own_requirements(fresh_venv, tmp_path):
    """The pyfunc model of a run, in a new venv holding torch (installed as cluster/install.sh
    does) and the model's requirements.txt only, held to the tested pins: no vdvae-dist
    installed, run from a folder outside the checkout. The model brings its own code."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    import torch

    from tests.integration.pyfunc_models import PREDICT_SCRIPT, REQUESTS, log_tiny_model
    from vdvae_dist.artifacts.weights import load_weights

    logged = log_tiny_model(tmp_path / "logged")
    model_dir = logged["model_dir"]
    venv = fresh_venv
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, "-r", str(model_dir / "requirements.txt"), "-c", str(REPO / "requirements.txt")], cwd=tmp_path,
         timeout=900)
    missing = _run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('vdvae_dist'))"],
                   cwd=tmp_path)
    assert missing.stdout.strip() == "None"  # the fresh environment has no vdvae-dist of its own
    work = tmp_path / "work"
    work.mkdir()
    (work / "requests.json").write_text(json.dumps(REQUESTS))
    script = work / PREDICT_SCRIPT.name
    script.write_text(PREDICT_SCRIPT.read_text())
    _run([str(venv / "bin" / "python"), str(script), str(model_dir), str(work)], cwd=work)

    where = json.loads((work / "where.json").read_text())["vdvae_dist"]
    assert Path(where).resolve().is_relative_to((model_dir / "code").resolve()), where  # the model's own code
    fresh = np.load(work / "images.npy")
    here = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame(REQUESTS))
    weights = load_weights(str(logged["export"]))
    with torch.no_grad():  # the exported weights themselves, each request seeded on its own
        want = torch.cat(weights.model.sample_batch(list(zip(*REQUESTS.values())))).numpy()
    assert fresh.dtype == np.uint8 and fresh.shape == (3, *weights.model.data_shape)
    assert np.array_equal(fresh, here) and np.array_equal(fresh, want)


@pytest.mark.integration
@pytest.mark.slow
def test_the_installed_wheel_trains_imports_and_answers_help(installed):
    venv, wheel, work = installed
    cli = str(venv / "bin" / "vdvae-dist")
    # the package comes from the venv, not from the checkout
    where = _run([str(venv / "bin" / "python"), "-c", "import vdvae_dist; print(vdvae_dist.__file__)"], cwd=work)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    assert "train" in _run([cli, "--help"], cwd=work).stdout

    # a 3-step run of the embedded default data (built into shards on the way)
    _run([cli, "train", "--preset", "tiny", "--set", "optim.total_steps=3", "--set", "optim.batch_size=4",
          "--set", "data.crops_per_image=4", "--set", "engine.precision=fp32", "--set", "engine.device=cpu",
          "--set", "train.grid_samples=1", "--set", f"train.output={work / 'run'}",
          "--set", f"data.shards={work / 'shards'}",
          "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"], cwd=work)
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["step"] == 3, summary
    assert (work / "run" / "ema_fp32.pt").is_file()

    # an official checkpoint imported into our export
    done = _run([cli, "import", "--from", "efficient-vdvae", "--checkpoint", str(EVD_MNIST / "checkpoint.pt"),
                 "--hparams", str(EVD_MNIST / "hparams.json"), "--out", str(work / "imported")], cwd=work)
    assert "imported ema weights (261,201 parameters" in done.stdout
    assert (work / "imported" / "ema_fp32.pt").is_file()


@pytest.mark.integration
@pytest.mark.slow
def test_the_installed_environment_is_consistent_and_keeps_the_pinned_torch(installed):
    venv, _, work = installed
    _run([str(venv / "bin" / "python"), "-m", "pip", "check"], cwd=work)
    version = _run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"], cwd=work)
    assert version.stdout.startswith("2.13.0"), version.stdout
    # the serve extra: the app imports where only the declared dependencies are installed
    _run([str(venv / "bin" / "python"), "-c", "import vdvae_dist.serve.app, multipart"], cwd=work)
