"""`make mutations` is the check before a release (it reruns test files once per mutation);
this cheap part runs with every suite: each listed mutation still finds its line exactly
once, names an existing file and changes it, so the list cannot go stale unnoticed."""
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LISTS = sorted((ROOT / "tests" / "mutations").glob("*.toml"))
MUTATIONS = [(f.name, m) for f in LISTS for m in tomllib.loads(f.read_text())["mutation"]]


def test_there_are_lists_of_mutations():
    assert LISTS and len(MUTATIONS) >= 50


@pytest.mark.parametrize("where,mutation", MUTATIONS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(MUTATIONS)])
def test_each_mutation_still_applies(where, mutation):
    assert set(mutation) >= {"why", "file", "find", "replace", "tests"}, where
    source = (ROOT / mutation["file"]).read_text()
    assert source.count(mutation["find"]) == 1, f"{where}: {mutation['why']}: the line is gone or not unique"
    assert mutation["find"] != mutation["replace"]
    for path in mutation["tests"].split():
        if path.startswith("tests/"):
            assert (ROOT / path.split("::")[0]).exists(), f"{where}: {path} does not exist"
