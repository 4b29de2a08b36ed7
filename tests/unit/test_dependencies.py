"""Every third-party module the package imports is a dependency pyproject.toml declares
(serve/ may also use the [serve] extra), and every declared dependency is pinned in
requirements.txt, the tested set cluster/install.sh installs. The slow, real check of the
same promise is tests/integration/test_package.py (the wheel in a fresh venv)."""
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.unit.test_architecture import PACKAGE, imports, package_of

ROOT = PACKAGE.parent


def _name(requirement: str) -> str:
    """'ray[default,train]==2.60.*' -> 'ray' (normalised as pip does)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": {_name(r) for r in project["dependencies"]}}
    groups.update({extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()})
    return groups


def third_party_imports(package: Path = PACKAGE) -> dict[tuple[str, str], str]:
    """(vdvae_dist package, top-level module) -> one file importing it, for every module that is
    neither the standard library nor vdvae_dist."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        for name in imports(path, package):
            top = name.split(".")[0]
            if top != package.name and top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault((package_of(path, package), top), str(path.relative_to(package.parent)))
    return found


def test_every_imported_module_is_a_declared_dependency():
    groups = declared()
    modules_to_dists = packages_distributions()
    missing = []
    for (part, module), where in third_party_imports().items():
        allowed = groups["core"] | (groups["serve"] if part == "serve" else set())
        dists = {_name(d) for d in modules_to_dists.get(module, [])}
        if not dists & allowed:
            missing.append(f"{where} imports {module} (from {sorted(dists) or 'no installed distribution'})")
    assert not missing, "not declared in pyproject.toml:\n" + "\n".join(missing)


def test_every_declared_dependency_is_pinned_in_requirements():
    pins = {_name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    unpinned = sorted(set().union(*declared().values()) - pins - {"torch"})
    assert not unpinned, f"declared in pyproject.toml but not pinned in requirements.txt: {unpinned}"
    extras = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if "[" in line.split("#")[0]]
    assert not extras, f"requirements.txt is a constraints file: no extras allowed ({extras})"


def test_the_guard_sees_an_undeclared_import(tmp_path):
    fake = tmp_path / "vdvae_dist"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "x.py").write_text("import yaml\nimport requests\nfrom . import y\n")
    assert set(third_party_imports(fake)) == {("model", "yaml"), ("model", "requests")}


def test_mlflow_finds_nvidia_ml_py_for_gpu_system_metrics():
    """MLflow's GPU monitor imports pynvml (nvidia-ml-py) itself and, without it, gives up with
    an ImportError; here it gets as far as NVML: a GPU's metrics where one is present."""
    import torch
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    assert "pynvml" in sys.modules  # imported by MLflow's module, as it is on every run
    if torch.cuda.is_available():
        assert GPUMonitor().num_gpus >= 1
    else:
        import pytest

        with pytest.raises(RuntimeError, match="Failed to initialize NVML"):  # no driver here, not no package
            GPUMonitor()
