"""How images are stored inside shards, shared by the shard builder and the streaming
pipeline: each sample is `{key}.png` (8-bit RGB or greyscale, lossless) or `{key}.jpg`,
at the dataset resolution in 8 bit (manifest.py names the shards and the keys).

Shards come from storage that others can write to, so reading them is bounded: a tar member
larger than `member_cap` is refused before it is read, images open only as the formats the
builder writes (no other PIL plugin, e.g. EPS, which runs Ghostscript), and an image whose
header declares more pixels than the dataset's is refused before it is decoded."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTS = ("png", "jpg")
IMAGE_FORMATS = ("PNG", "JPEG")  # PIL formats of IMAGE_EXTS: the only plugins shards are opened with
# without a known resolution (a bare StreamSpec): 8192 x 8192 pixels, 64 MiB per member
UNKNOWN_SIDE_PIXELS = 8192 * 8192
UNKNOWN_SIDE_MEMBER_BYTES = 64 * 2**20


def member_cap(resolution: int | None, channels: int) -> int:
    """The largest tar member a shard of this dataset may hold, in bytes: twice the raw
    pixels (PNG of noise and JPEG at quality 95 stay below the raw size) plus 64 KiB of
    headers and metadata. A member over it is refused before it is read."""
    if resolution is None:
        return UNKNOWN_SIDE_MEMBER_BYTES
    return 2 * resolution * resolution * channels + 64 * 2**10


def encode_image(img_HWC: np.ndarray, fmt: str = "png") -> bytes:
    """Deterministic encoding: the same pixels give the same bytes."""
    arr = img_HWC[..., 0] if img_HWC.shape[-1] == 1 else img_HWC
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "jpg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        raise ValueError(f"format={fmt!r} is unknown; allowed: png | jpg")
    return buf.getvalue()


def binarize_pixels(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stochastic binarization of uint8 images: each pixel is 255 with probability
    intensity / 255, else 0 (the binarized-MNIST convention)."""
    return np.where(rng.random(images.shape) < images / 255.0, 255, 0).astype(np.uint8)


def image_mode(channels: int) -> str:
    """The PIL mode images of a dataset with `channels` channels are stored in."""
    return "L" if channels == 1 else "RGB"


def decode_image(data: bytes, channels: int, resolution: int | None = None) -> np.ndarray:
    """bytes -> uint8 (C, H, W) with the dataset's channel count. With `resolution`, the
    image is checked instead of converted: one that is not `resolution` square in the
    dataset's mode (L for 1 channel, RGB for 3) is a ValueError. Only PNG and JPEG are
    opened, and an image is refused from its header, before any pixel is decoded, when it
    declares another size than `resolution` (without one: more than UNKNOWN_SIDE_PIXELS),
    so a small file that inflates to gigabytes (a decompression bomb) is never decoded."""
    img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    if resolution is None and img.width * img.height > UNKNOWN_SIDE_PIXELS:
        raise ValueError(f"image declares {img.width}x{img.height} pixels, more than the {UNKNOWN_SIDE_PIXELS} allowed")
    mode = image_mode(channels)
    if resolution is not None and (img.mode != mode or img.size != (resolution, resolution)):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]} {img.mode}; the dataset holds "
                         f"{resolution}x{resolution} {mode}")
    img = img.convert(mode)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)
