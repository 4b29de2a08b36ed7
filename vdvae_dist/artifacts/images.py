"""Image helpers shared by data and serve: grids as PNG (sample grids, reconstructions), and
the centred square crop and resize that shard builders and uploads to the service both use."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # annotations only: data/readers.py imports this module and stays free of torch
    import torch


READABLE_SIDE = 96  # px per image in the grids people look at (run folder, MLflow, figures)
SOURCE_FORMATS = ("PNG", "JPEG", "WEBP")  # the image files dataset sources hold
MAX_SOURCE_PIXELS = 8192 * 8192  # far above FFHQ's 1024 x 1024; a header beyond it is a decompression bomb


def upscaled(images_NCHW: torch.Tensor | np.ndarray, min_side: int) -> np.ndarray:
    """Each image enlarged by the smallest whole factor that makes its shorter side at least
    min_side, every pixel a square block (no interpolation: the model's own pixels)."""
    x = np.asarray(images_NCHW)
    factor = max(1, -(-min_side // min(x.shape[-2:])))
    return x.repeat(factor, axis=-2).repeat(factor, axis=-1) if factor > 1 else x


def grid(images_NCHW: torch.Tensor | np.ndarray, cols: int | None = None, pad: int = 2, min_side: int = 0) -> np.ndarray:
    """uint8 (N, C, H, W) -> one HWC uint8 grid image; min_side: images upscaled to at least
    that many pixels a side (see upscaled)."""
    x = upscaled(images_NCHW, min_side) if min_side else np.asarray(images_NCHW)
    n, c, h, w = x.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = \
            x[i].transpose(1, 2, 0)
    return out


def save_grid(images_NCHW, path: str | Path, cols: int | None = None, min_side: int = 0) -> Path:
    g = grid(images_NCHW, cols, min_side=min_side)
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    path = Path(path)
    img.save(path)
    return path


def open_image(file, formats: tuple[str, ...] = SOURCE_FORMATS, max_pixels: int = MAX_SOURCE_PIXELS) -> Image.Image:
    """An image file opened (header only) as one of `formats`, never by another Pillow plugin
    (EPS, for one, runs Ghostscript); a ValueError naming the file when its header declares
    more than `max_pixels` pixels, before any of them is decoded."""
    img = Image.open(file, formats=formats)
    if img.width * img.height > max_pixels:
        raise ValueError(f"{file}: image declares {img.width}x{img.height} pixels, more than the {max_pixels} allowed")
    return img


def upright_rgb(img: Image.Image) -> Image.Image:
    """The image as a person sees it, in 8-bit RGB: turned by its EXIF orientation (cameras
    store the rotation there), and 16-bit greyscale scaled to 8 bits (a plain convert clips
    every value above 255 to white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, side: int) -> np.ndarray:
    """Centred square crop resized to side x side (PIL's ImageOps.fit), HWC uint8 RGB."""
    return np.asarray(ImageOps.fit(upright_rgb(img), (side, side), Image.Resampling.LANCZOS), dtype=np.uint8)


def png_bytes(image_HWC: np.ndarray) -> bytes:
    """An HWC uint8 image (1 or 3 channels) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image_HWC.squeeze(-1) if image_HWC.shape[-1] == 1 else image_HWC).save(buf, format="PNG")
    return buf.getvalue()
