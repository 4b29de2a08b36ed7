"""The dataset manifest templates in shards/ reference real readers, presets and flags."""
import shlex
import tomllib
from pathlib import Path

import pytest

from vdvae_dist.cli import main
from vdvae_dist.config import available_presets, load
from vdvae_dist.data.sources import KINDS

TEMPLATES = sorted((Path(__file__).parents[2] / "shards").glob("*.toml"))


def test_one_template_per_paper_dataset():
    assert {t.stem for t in TEMPLATES} == {"ffhq256", "ffhq1024", "imagenet32", "imagenet64", "cifar10", "celeba64", "mnist"}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_is_consistent(path, monkeypatch):
    t = tomllib.loads(path.read_text())
    assert t["source_kind"] in KINDS and t["preset"] in available_presets()
    assert load(t["preset"]).data.resolution == t["resolution"]
    argv = shlex.split(t["build"])
    assert argv[:3] == ["vdvae-dist", "shards", "build"]
    assert argv[argv.index("--source") + 1].startswith(t["source_kind"] + ":")
    assert int(argv[argv.index("--resolution") + 1]) == t["resolution"]
    # the command parses with the real CLI (it stops at the missing source folder)
    assert main(argv[1:]) == 2
