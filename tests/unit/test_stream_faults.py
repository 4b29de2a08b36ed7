"""Bad data inside a shard set, on real shard files: lost shards count the samples the
manifest lists for them, images of the wrong size or mode are skipped and counted, and
URLs with credentials never reach a log line or an error message."""
import functools
import http.server
import io
import math
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests import shard_edits
from vdvae_dist.data.format import encode_image
from vdvae_dist.data.shardwriter import TAR_MEMBER_OVERHEAD, build
from vdvae_dist.data.stream import ShardStream, StreamSpec, TrainLoader, eval_loader, split_urls, train_loader

SIDE, PER_SHARD, SEED, BATCH = 8, 100, 4, 20  # 10 train shards of 100 RGB 8x8 images, 1 val shard


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    m = shard_edits.random_dataset(root, 1100, SIDE, PER_SHARD, val=100)
    assert [s.samples for s in m.shards] == [PER_SHARD] * 11 and m.splits == {"train": 1000, "val": 100}
    return root / "ds"


@pytest.fixture
def ds(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "ds")
    return tmp_path / "ds"


def _order(ds) -> list[str]:
    """Train shard file names in the order epoch 0 of one reader (seed SEED) reads them."""
    urls, _ = split_urls(str(ds), "train")
    return [urls[i].rsplit("/", 1)[-1] for i in ShardStream(StreamSpec(urls, 3, BATCH, seed=SEED)).shards_for(0, 0, 1)]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _png(mode, side):
    buf = io.BytesIO()
    Image.new(mode, (side, side), 200).save(buf, format="PNG")
    return buf.getvalue()


def test_lost_shards_count_the_samples_the_manifest_lists(ds, caplog):
    order = _order(ds)
    for name in (order[2], order[5], order[8]):  # 3 of 10 shards, 30% of the data, none read first or last
        (ds / name).unlink()
    with pytest.raises(RuntimeError, match=r"3 of the 10 train shards are missing .*\(300 of 1000 samples\).*"
                                           r"data.max_bad_fraction=0.01"):
        _take(train_loader(str(ds), BATCH, seed=SEED, shuffle_buffer=BATCH, num_workers=0), 700 // BATCH)
    caplog.clear()
    loader = train_loader(str(ds), BATCH, seed=SEED, shuffle_buffer=BATCH, num_workers=0, max_bad_fraction=0.5)
    batches = _take(loader, 700 // BATCH)  # every image of epoch 0's 7 readable shards
    assert all(b.shape == (BATCH, 3, SIDE, SIDE) for b in batches)
    assert loader.bad_samples == 3 * PER_SHARD
    assert all(name in caplog.text for name in (order[2], order[5], order[8]))
    assert "retrying" not in caplog.text  # a missing object is an answer, not a transient failure


def test_shards_that_turn_bad_during_the_run_fail_it_past_the_fraction(ds, caplog):
    order = _order(ds)
    for name in (order[2], order[5], order[8]):  # 30%, present at their size but zeroed: found while reading
        (ds / name).write_bytes(bytes((ds / name).stat().st_size))
    loader = train_loader(str(ds), BATCH, seed=SEED, shuffle_buffer=BATCH, num_workers=0)
    with pytest.raises(RuntimeError, match=r"100 of the 1000 samples of one pass over the split are lost \(0 in "
                                           r"shards missing when the loader started, 100 lost by this reader"):
        _take(loader, 700 // BATCH)
    assert f"skipped shard in file://{ds / order[2]}: ShardMismatch: its SHA-256 is" in caplog.text


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """200 train shards of 10 greyscale 4x4 images each."""
    root = tmp_path_factory.mktemp("many")
    images = np.random.default_rng(0).integers(0, 256, (2000, 1, 4, 4), dtype=np.uint8)
    np.savez(root / "src.npz", data=images)
    mean = sum(len(encode_image(img.transpose(1, 2, 0))) + TAR_MEMBER_OVERHEAD for img in images[:32]) / 32
    m = build(f"npz:{root / 'src.npz'}", str(root / "ds"), 4, shard_bytes=math.ceil(10 * mean), progress=False)
    assert [s.samples for s in m.shards] == [10] * 200
    return root / "ds"


@pytest.mark.parametrize("how", ["missing", "zeroed"])
def test_one_bad_shard_in_200_does_not_fail_a_one_percent_run(many_shards, tmp_path, how, caplog):
    # rank 0 of 8 reads 25 shards; its 8th is bad: 10 of its first 80 samples (12%), 4% of
    # its share, 0.5% of the run's data. A run allowing 1% goes on.
    ds = tmp_path / "ds"
    shutil.copytree(many_shards, ds)
    urls, _ = split_urls(str(ds), "train")
    mine = ShardStream(StreamSpec(urls, 1, 10, seed=SEED, rank=0, world=8)).shards_for(0, 0, 1)
    bad = ds / urls[mine[7]].rsplit("/", 1)[-1]
    if how == "missing":
        bad.unlink()
    else:  # present at its size, not a tar any more: found only while reading
        bad.write_bytes(bytes(bad.stat().st_size))
    loader = train_loader(str(ds), 10, seed=SEED, rank=0, world=8, shuffle_buffer=10, num_workers=0,
                          max_bad_fraction=0.01)
    batches = _take(loader, 30)  # the whole of epoch 0 (24 good shards) and into epoch 1
    assert all(b.shape == (10, 1, 4, 4) for b in batches)
    assert loader.bad_samples >= 10 and bad.name in caplog.text


def test_a_shard_that_ends_early_loses_the_rest_of_its_samples(ds, caplog):
    first = ds / _order(ds)[0]
    shard_edits.write_members(first, shard_edits.members(first)[:60])  # a shorter, valid tar: no read error at all
    shard_edits.as_built(ds, first)  # the manifest still lists 100 samples
    loader = train_loader(str(ds), BATCH, seed=SEED, shuffle_buffer=BATCH, num_workers=0, max_bad_fraction=0.5)
    batches = _take(loader, 960 // BATCH)
    assert all(b.shape == (BATCH, 3, SIDE, SIDE) for b in batches)
    assert loader.bad_samples == PER_SHARD - 60
    assert f"{first.name}" in caplog.text and "ended after 60 of the 100 samples" in caplog.text


def test_images_of_the_wrong_size_or_mode_are_skipped_and_counted(ds, caplog):
    first = ds / _order(ds)[0]
    members = shard_edits.members(first)
    wrong = {5: _png("RGB", 4), 6: _png("RGBA", SIDE), 7: _png("L", SIDE)}  # 4x4, alpha, greyscale
    shard_edits.write_members(first, [(m, wrong.get(i, data)) for i, (m, data) in enumerate(members)])
    shard_edits.as_built(ds, first)
    loader = train_loader(str(ds), BATCH, seed=SEED, shuffle_buffer=BATCH, num_workers=0)
    batches = _take(loader, 980 // BATCH)
    assert all(b.shape == (BATCH, 3, SIDE, SIDE) and b.dtype == torch.uint8 for b in batches)
    assert loader.bad_samples == 3
    for i, what in [(5, "4x4 RGB"), (6, "8x8 RGBA"), (7, "8x8 L")]:
        key = members[i][0].name.split(".")[0]
        assert f"skipped image {key} in file://{first}: image is {what}; the dataset holds 8x8 RGB" in caplog.text


def test_an_exact_pass_names_the_shard_and_key_of_a_wrong_image(ds):
    val = ds / "val-00000.tar"
    members = shard_edits.members(val)
    shard_edits.write_members(val, [(m, _png("RGB", 16) if i == 42 else data) for i, (m, data) in enumerate(members)])
    key = members[42][0].name.split(".")[0]
    with pytest.raises(ValueError, match=rf"val-00000\.tar: sample {key}: image is 16x16 RGB; the dataset holds 8x8"):
        for _ in eval_loader(str(ds), "val", 16, num_workers=0):
            pass


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(dataset):
    """A real HTTP server (stdlib) serving the dataset's folder; it ignores the credentials."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(dataset)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://trainer:hunter2-secret@127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_urls_with_credentials_never_reach_the_logs_or_errors(http_root, caplog):
    good, gone = f"{http_root}/train-00000.tar", f"{http_root}/no-such-shard.tar"
    loader = TrainLoader(StreamSpec([good, gone], 3, BATCH, seed=SEED, shuffle_buffer=BATCH, max_bad_fraction=0.9),
                         num_workers=0)
    assert all(b.shape == (BATCH, 3, SIDE, SIDE) for b in _take(loader, 8))  # the good shard streams over HTTP
    assert loader.bad_samples >= 1 and "no-such-shard.tar" in caplog.text
    only_gone = TrainLoader(StreamSpec([gone], 3, BATCH), num_workers=0)
    with pytest.raises(RuntimeError, match="every shard of epoch 0 failed") as e:
        next(only_gone)
    assert "hunter2" not in caplog.text and "hunter2" not in str(e.value)
    assert "http://***@127.0.0.1" in caplog.text and "http://***@127.0.0.1" in str(e.value)


def test_a_dataset_served_over_http_streams_and_evaluates(http_root):
    loader = train_loader(http_root, BATCH, seed=SEED, shuffle_buffer=BATCH, num_workers=0)
    assert all(b.shape == (BATCH, 3, SIDE, SIDE) for b in _take(loader, 60))  # 1.2 epochs of the 10 shards
    assert loader.bad_samples == 0
    keys = [k for _, batch_keys in eval_loader(http_root, "val", 32, num_workers=0) for k in batch_keys]
    assert sorted(keys) == [f"val-{i:08d}" for i in range(100)]


def test_shards_are_not_built_at_an_http_url(http_root, tmp_path):
    np.savez(tmp_path / "src.npz", data=np.zeros((4, SIDE, SIDE, 3), np.uint8))
    with pytest.raises(ValueError, match=r"--out=http://\*\*\*@127.0.0.1:\d+/new is out of range: http\(s\) URLs are "
                                         r"read-only; allowed: a path, file://, s3:// or gs://"):
        build(f"npz:{tmp_path / 'src.npz'}", f"{http_root}/new", SIDE, progress=False)
