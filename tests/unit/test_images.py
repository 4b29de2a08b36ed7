"""Images enter the project as a person sees them (issue 23: EXIF orientation was ignored and
16-bit PNGs came out almost white)."""
import io

import numpy as np
from PIL import Image

from vdvae_dist.artifacts.images import resize_center_crop
from vdvae_dist.data.readers import read_folder


def _reopened(img: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_16_bit_greyscale_keeps_its_tones():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    img = _reopened(Image.fromarray(ramp), "PNG")
    assert img.mode in ("I", "I;16")  # what Pillow gives for a 16-bit PNG
    out = resize_center_crop(img, 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out[..., 0].astype(float), ramp / 257.0, atol=1.0)
    assert out.mean() < 160  # a plain convert made almost every pixel 255


def test_exif_orientation_turns_the_image_upright(tmp_path):
    # a 2:1 landscape image whose left half is white, stored with "rotate 90" in its EXIF:
    # a viewer shows it as portrait, with the white half at the top or bottom
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(path, "JPEG", exif=exif, quality=95)
    source = read_folder(str(tmp_path), 16)  # an image folder, as `shards build` reads it
    out = source.image(source.splits["train"][0])
    rows = out.mean(axis=(1, 2))
    cols = out.mean(axis=(0, 2))
    # upright: bright and dark halves split by rows (top/bottom), not by columns
    assert abs(rows[:8].mean() - rows[8:].mean()) > 100 and abs(cols[:8].mean() - cols[8:].mean()) < 30


def test_source_images_open_only_as_png_jpeg_or_webp_within_a_pixel_cap(tmp_path):
    import struct
    import zlib

    import pytest
    from PIL import UnidentifiedImageError

    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png", "BMP")  # a BMP behind a .png name
    source = read_folder(str(tmp_path), 8)
    with pytest.raises(UnidentifiedImageError):
        source.image(source.splits["train"][0])
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 9000, 9000)  # the header of an 81 M pixel image, 70 bytes long
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "a.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"a\.png: image declares 9000x9000 pixels, more than the 67108864 allowed"):
        source.image(source.splits["train"][0])
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png", "WEBP")  # WebP is a source format
    assert source.image(source.splits["train"][0]).shape == (8, 8, 3)
