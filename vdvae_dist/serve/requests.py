"""Request schemas, their checks against the loaded model, and image encoding (no Ray).

Every rejected input becomes a `RequestError` naming the field and the allowed values;
`http_errors.py` turns it into a JSON 4xx response (the app also raises it for its 5xx ones).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import PurePath
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..artifacts.images import resize_center_crop

MAX_SEED = 2**63 - 1
RETRY_AFTER_S = 1  # the Retry-After of every 503 (Serve's queue limit, or a busy replica)
MAX_TEMPERATURE = 10.0  # prior temperatures above this give noise, not images
# Uploads: the decoded size is bounded before anything is decoded (a small file may expand to
# a huge image: a 38-byte WebP holds a 40-megapixel constant image), on both sides of the
# resize: at most `Limits.max_pixels` pixels in (a budget that follows the model's
# resolution: UPLOAD_PIXELS_PER_MODEL_PIXEL times its H x W, at least MIN_UPLOAD_PIXELS so
# that an ordinary photo still fits a small model, at most MAX_UPLOAD_PIXELS), a longer side
# at most MAX_ASPECT times the shorter one (so the image resized to the model's resolution on
# its shorter side stays within MAX_ASPECT x resolution^2 pixels), and exactly resolution x
# resolution pixels out.
UPLOAD_PIXELS_PER_MODEL_PIXEL = 64
MIN_UPLOAD_PIXELS = 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
MAX_ASPECT = 16
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # PIL decoders tried; every other format is refused
IMAGE_FORMATS_TEXT = "a PNG, JPEG, WebP or BMP file"
# Multipart form fields arrive as text: an integer needs no more characters than this...
MAX_INT_CHARS = 40
# ...and a JSON list of per-group temperatures no more than this.
MAX_LIST_CHARS = 64 * 1024


class RequestError(ValueError):
    def __init__(self, field: str, error: str, allowed: str, status: int = 422, request_id: str = ""):
        super().__init__(f"{field}: {error}; allowed: {allowed}")
        self.field, self.error, self.allowed, self.status = field, error, allowed, status
        self.request_id = request_id  # a 500's: the key to its detail in the replica's log

    def body(self) -> dict:
        body = {"error": self.error, "field": self.field, "allowed": self.allowed}
        return {**body, "request_id": self.request_id} if self.request_id else body


class SampleRequest(BaseModel):
    """POST /sample"""

    # strict: JSON true is not a number, "3" and 3.0 are not integers
    model_config = ConfigDict(extra="forbid", strict=True)
    n: int = Field(1, description="number of images, 1..serve.max_n")
    temperature: float | list[float] = Field(
        1.0, description=f"prior temperature in [0, {MAX_TEMPERATURE:g}]: one value, or one per latent group "
                         "(see /info)")
    seed: int | None = Field(None, description="0..2^63-1; the same seed gives the same images")
    format: Literal["png", "npy"] = Field("png", description="png (one image or a grid) or npy (uint8 N,C,H,W)")
    grid: bool = Field(True, description="png only: all images in one grid; false requires n = 1")


class ReconstructRequest(BaseModel):
    """POST /reconstruct as JSON (or the same fields as multipart form data with an `image` file)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image_base64: str = Field(description="the image file (PNG, JPEG, WebP or BMP) base64-encoded")
    depth: int = Field(description="latent groups taken from the posterior, 0..groups (see /info)")
    temperature: float | list[float] = Field(
        1.0, description=f"prior temperature in [0, {MAX_TEMPERATURE:g}] for the groups below depth")
    seed: int | None = Field(None, description="0..2^63-1")


class Limits:
    """What the loaded model and the serve config allow."""

    def __init__(self, max_n: int, groups: int, channels: int, resolution: int):
        self.max_n, self.groups, self.channels, self.resolution = max_n, groups, channels, resolution
        # the decode budget: a decoded upload costs its pixels in time and memory, so the
        # budget follows what the model needs (a 32-px model has no use for 40 megapixels)
        self.max_pixels = min(MAX_UPLOAD_PIXELS, max(MIN_UPLOAD_PIXELS, UPLOAD_PIXELS_PER_MODEL_PIXEL * resolution ** 2))

    def temperature(self, value: float | list[float]) -> list[float]:
        allowed = (f"a number >= 0 and <= {MAX_TEMPERATURE:g}, or a list of exactly {self.groups} numbers >= 0 "
                   f"and <= {MAX_TEMPERATURE:g} (one per latent group)")
        values = [value] if _is_number(value) else value if isinstance(value, list) else None
        if values is None:
            raise RequestError("temperature", f"{type(value).__name__} is not a number", allowed)
        if not _is_number(value) and len(values) != self.groups:
            raise RequestError("temperature", f"{len(values)} values given", allowed)
        # comparisons, not float(): a huge JSON integer would overflow; NaN fails both
        if any(not (_is_number(t) and 0 <= t <= MAX_TEMPERATURE) for t in values):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise RequestError("temperature", f"{shown} is out of range", allowed)
        return [float(t) for t in values] * (self.groups if len(values) == 1 else 1)

    def seed(self, value: int | None) -> int | None:
        if value is not None and not (_is_int(value) and 0 <= value <= MAX_SEED):
            raise RequestError("seed", f"{_short(value)} is out of range", f"0..{MAX_SEED}")
        return value

    def sample(self, r: SampleRequest) -> dict:
        if not (_is_int(r.n) and 1 <= r.n <= self.max_n):
            raise RequestError("n", f"{_short(r.n)} is out of range", f"1..{self.max_n}")
        if r.format == "png" and not r.grid and r.n != 1:
            raise RequestError("grid", "false with n > 1 (one PNG holds one image)", "true, or n = 1, or format npy")
        return {"n": r.n, "temperature": self.temperature(r.temperature), "seed": self.seed(r.seed)}

    def depth(self, value: int) -> int:
        if not (_is_int(value) and 0 <= value <= self.groups):
            raise RequestError("depth", f"{_short(value)} is out of range", f"0..{self.groups}")
        return value

    def image(self, data: bytes) -> np.ndarray:
        """An uploaded image file -> uint8 (C, H, W) at the model's resolution, resized
        (shorter side) and centre-cropped as the shard builders prepare training images.
        Blocking (decoding within the budget takes milliseconds to a second): the app runs it
        in a thread."""
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        except Exception as e:  # an unknown or refused format, or a broken header
            raise RequestError("image", f"not a decodable image ({type(e).__name__})", IMAGE_FORMATS_TEXT,
                               status=400) from e
        width, height = img.size
        if min(width, height) < 1:
            raise RequestError("image", f"{width}x{height} pixels is empty", "an image of at least 1x1 pixels")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise RequestError("image", f"{width}x{height} pixels is too thin",
                               f"a longer side at most {MAX_ASPECT} times the shorter one")
        if width * height > self.max_pixels:
            r = self.resolution
            raise RequestError("image", f"{width}x{height} pixels is too large",
                               f"at most {self.max_pixels:,} pixels (the upload decode budget of this {r}x{r} model: "
                               f"{UPLOAD_PIXELS_PER_MODEL_PIXEL} x its pixels, at least {MIN_UPLOAD_PIXELS:,}, at most "
                               f"{MAX_UPLOAD_PIXELS:,}); a smaller image")
        try:
            img.load()
            rgb_HWC = resize_center_crop(img, self.resolution)
        except MemoryError as e:  # within the bounds above only when the replica is short of memory
            raise RequestError("image", "no memory to decode it now", "the same upload later", status=503) from e
        except Exception as e:  # anything PIL cannot decode
            raise RequestError("image", f"not a decodable image ({type(e).__name__})", IMAGE_FORMATS_TEXT,
                               status=400) from e
        finally:
            img.close()
        if rgb_HWC.shape != (self.resolution, self.resolution, 3):  # the other side of the resize
            raise RequestError("image", f"resized to {rgb_HWC.shape}", "an image the service can resize", status=400)
        if self.channels == 1:
            return np.asarray(Image.fromarray(rgb_HWC).convert("L"))[None]
        return rgb_HWC.transpose(2, 0, 1).copy()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value) if not _is_int(value) or value.bit_length() < 256 else "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def decode_base64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError("image_base64", "not valid base64", "a base64-encoded image file", status=400) from e


def form_value(field: str, raw: str | None, kind: str):
    """Multipart form fields arrive as text: numbers, or a JSON list for per-group temperatures.
    Booleans are not numbers; over-long text (a 5,000-digit integer) is refused unparsed."""
    if raw is None:
        return None
    allowed = "an integer" if kind == "int" else "a number or a JSON list of numbers"
    limit = MAX_INT_CHARS if kind == "int" else MAX_LIST_CHARS
    if len(raw) > limit:
        raise RequestError(field, f"{len(raw):,} characters is too long", f"{allowed} of at most {limit:,} characters")
    try:
        value = json.loads(raw)
    except ValueError:  # JSONDecodeError, or an integer past Python's digit limit
        value = raw
    ok = {"int": _is_int(value),
          "temperature": _is_number(value) or isinstance(value, list) and all(_is_number(v) for v in value)}[kind]
    if not ok:
        shown = repr(raw) if len(raw) <= 40 else repr(raw[:37]) + "..."
        raise RequestError(field, f"{shown} is not {allowed}", allowed)
    return value


def redact_uri(uri: str) -> str:
    """A URI fit to show: no user:password@ (nor a query or fragment, where signed URLs keep
    their keys). Plain paths and runs:/ URIs come back unchanged."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if not parts.scheme or not (parts.netloc or parts.query or parts.fragment):
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def shown_source(source: str) -> str:
    """The model's source fit for /info: a URI without credentials, a local path as its last
    two parts (the run folder and file; where it lies on the replica's disk is not the
    clients' business)."""
    shown = redact_uri(source)
    if "://" in shown or shown.startswith("runs:/") or shown.startswith("models:/"):
        return shown
    return "/".join(PurePath(shown).parts[-2:])


def npy_bytes(images_NCHW: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, images_NCHW, allow_pickle=False)
    return buf.getvalue()
