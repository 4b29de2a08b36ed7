"""The layering of docs/architecture.md, checked against the imports of every module under
vdvae_dist/ (those inside functions included): no import the table does not allow, no
cycle between packages, and the third-party rules."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vdvae_dist"
DOC = ROOT / "docs" / "architecture.md"


def allowed_edges() -> dict[str, set[str]]:
    """package -> the packages it may import, from the table in docs/architecture.md."""
    rows = re.findall(r"^\| (\w+) \| (\d) \|([\w, ]*)\|", DOC.read_text(), flags=re.M)
    assert rows, "no package table found in docs/architecture.md"
    return {name: {p.strip() for p in may.split(",") if p.strip()} for name, _floor, may in rows}


def package_of(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package).parts
    return parts[0] if len(parts) > 1 else path.stem


def imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """Absolute names of everything `path` imports (relative imports resolved)."""
    here = list(path.relative_to(package.parent).parts[:-1])  # the importing module's package
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def edges(package: Path = PACKAGE) -> dict[tuple[str, str], list[str]]:
    """(package, imported package) -> the files that make the edge."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        source = package_of(path, package)
        for name in imports(path, package):
            parts = name.split(".")
            if parts[0] == package.name and len(parts) > 1 and parts[1] != source:
                found.setdefault((source, parts[1]), []).append(str(path.relative_to(package.parent)))
    return found


def test_every_package_is_in_the_table():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} | {"cli"}
    assert packages == set(allowed_edges()), "docs/architecture.md's table and vdvae_dist/ differ"


def test_imports_follow_the_documented_layering():
    allowed = allowed_edges()
    bad = [f"{a} -> {b} (in {', '.join(sorted(set(files)))})" for (a, b), files in edges().items()
           if b not in allowed.get(a, set())]
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_packages_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


THIRD_PARTY = {  # library -> the packages allowed to import it
    "deepspeed": {"engine", "plan"},
    "ray.train": {"launch"},
    "ray.serve": {"serve"},
    "mlflow": {"tracking"},
}
NOT_IN_MODEL_OR_CONFIG = ("ray", "deepspeed", "mlflow", "webdataset", "fsspec")
# the one module that names Ray's private calls (pinned to a Ray release), whichever library
RAY_PRIVATE = PACKAGE / "core" / "ray_private.py"


def test_third_party_libraries_stay_in_their_packages():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = package_of(path)
        for name in imports(path):
            for lib, owners in THIRD_PARTY.items():
                if (name == lib or name.startswith(lib + ".")) and source not in owners and not (
                        path == RAY_PRIVATE and lib.startswith("ray.")):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if source in ("model", "config") and name.split(".")[0] in NOT_IN_MODEL_OR_CONFIG:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_guard_sees_imports_against_the_layering(tmp_path):
    """The check itself: a relative import inside a function and an absolute one are found."""
    fake = tmp_path / "vdvae_dist"
    for pkg in ("model", "train", "serve"):
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text("def f():\n    from ..train import loop\n")
    (fake / "serve" / "worse.py").write_text("import vdvae_dist.train.loop\n")
    assert set(edges(fake)) == {("model", "train"), ("serve", "train")}
