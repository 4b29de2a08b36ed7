"""What a shard from storage others can write to may cost a reader (issue 23 N4), on real
shard files: no decompression, a member size cap checked on the tar header, members that
are not images passed over, PNG/JPEG only with a pixel cap, and the manifest's SHA-256
checked as the bytes pass."""
import hashlib
import io
import json
import lzma
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from tests.shard_edits import as_built, random_dataset
from vdvae_dist.data.format import decode_image, member_cap
from vdvae_dist.data.shardread import BadShard, ShardMismatch, read_shard
from vdvae_dist.data.stream import eval_loader, split_urls, train_loader

SIDE, PER_SHARD = 8, 20
CAP = member_cap(SIDE, 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    m = random_dataset(root, 80, SIDE, PER_SHARD, val=PER_SHARD)
    assert [s.samples for s in m.shards] == [PER_SHARD] * 4
    return root / "ds"


@pytest.fixture
def ds(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "ds")
    return tmp_path / "ds"


def _manifest_entry(ds, name):
    return next(s for s in json.loads((ds / "manifest.json").read_text())["shards"] if s["name"] == name)


def _bounded(ds, name):
    info = _manifest_entry(ds, name)
    return {"cap": CAP, "size": info["bytes"], "sha256": info["sha256"]}


def _png(side=SIDE, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (side, side), 90).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members) -> bytes:
    """A plain tar of (name, bytes) members; bytes None: a folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_compressed_shard_is_refused_without_inflating_it(ds):
    # 30 kB of xz that inflate to a tar holding one 200 MB "image"
    packer = lzma.LZMACompressor(preset=1)
    header = tarfile.TarInfo("train-00000000.png")
    header.size = 200 * 2**20
    parts = [packer.compress(header.tobuf(format=tarfile.GNU_FORMAT))]
    parts += [packer.compress(bytes(2**20)) for _ in range(200)] + [packer.compress(bytes(1024)), packer.flush()]
    shard = ds / "train-00000.tar"
    shard.write_bytes(b"".join(parts))
    assert shard.stat().st_size < 100_000
    as_built(ds, shard)
    with pytest.raises(tarfile.ReadError):  # read as a plain tar, xz bytes hold no tar header
        list(read_shard(f"file://{shard}", **_bounded(ds, shard.name)))
    for name in ("train-00000.tar.gz", "train-00000.tar.xz"):  # a name asking for a codec gets none either
        (ds / name).write_bytes(shard.read_bytes())
        with pytest.raises(tarfile.ReadError):
            list(read_shard(f"file://{ds / name}", cap=CAP))


def test_a_member_over_the_cap_is_refused_from_its_tar_header(ds):
    # a first, good image; then a header claiming 4 GiB followed by a few bytes: a reader that
    # trusted it would try to hold 4 GiB
    png = _png()
    good = tarfile.TarInfo("train-00000000.png")
    good.size = len(png)
    huge = tarfile.TarInfo("train-00000001.png")
    huge.size = 4 * 2**30
    shard = ds / "train-00000.tar"
    shard.write_bytes(good.tobuf(format=tarfile.GNU_FORMAT) + png + bytes(-len(png) % 512)
                      + huge.tobuf(format=tarfile.GNU_FORMAT) + bytes(4096))
    as_built(ds, shard)
    samples = read_shard(f"file://{shard}", **_bounded(ds, shard.name))
    assert next(samples)[1] == "train-00000000"
    with pytest.raises(BadShard, match=rf"member 'train-00000001.png' is {4 * 2**30} bytes; at most {CAP} "):
        next(samples)

def test_in_a_training_stream_a_refused_shard_counts_and_the_rest_streams_on(ds, caplog):
    huge = tarfile.TarInfo("train-00000000.png")
    huge.size = 4 * 2**30
    shard = ds / "train-00000.tar"
    shard.write_bytes(huge.tobuf(format=tarfile.GNU_FORMAT) + bytes(4096))
    as_built(ds, shard)
    loader = train_loader(str(ds), 10, num_workers=0, shuffle_buffer=10, max_bad_fraction=0.5)
    assert all(next(loader).shape == (10, 3, SIDE, SIDE) for _ in range(5))  # the 2 good shards and on
    assert loader.bad_samples >= PER_SHARD
    assert f"skipped shard in file://{shard}: BadShard: member 'train-00000000.png' is 4294967296 bytes" in caplog.text


def test_members_that_are_not_images_are_passed_over(ds):
    shard = ds / "train-00000.tar"
    shard.write_bytes(_tar([("a", None), ("a/k-1.png", _png()), ("a/k-1.json", b"{}" * 100),
                            ("a/k-1.jpg", _png()), ("a/k-2.cls", b"7"), ("a/k-3.PNG", _png()),
                            ("notes.txt", b"x" * 5000)]))
    as_built(ds, shard)
    got = [(i, key) for i, key, _ in read_shard(f"file://{shard}", **_bounded(ds, shard.name))]
    assert got == [(0, "a/k-1"), (1, "a/k-3")]  # one image per key; no folder, metadata or text


def test_images_open_only_as_png_or_jpeg():
    pixels = np.random.default_rng(1).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        assert decode_image(buf.getvalue(), 3, SIDE).shape == (3, SIDE, SIDE)
    for fmt in ("BMP", "TIFF", "GIF"):  # decodable by Pillow, not written by the builder
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("P" if fmt == "GIF" else "RGB").save(buf, format=fmt)
        with pytest.raises(UnidentifiedImageError):
            decode_image(buf.getvalue(), 3, None if fmt == "GIF" else SIDE)


def _png_declaring(width, height) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's header)."""
    data = bytearray(_png(1, "L"))
    ihdr = 8  # after the signature: length, b"IHDR", width, height, ...
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4: ihdr + 8 + 13]))
    data[ihdr + 8 + 13: ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    bomb = _png_declaring(9000, 9000)  # 81 M pixels: under Pillow's own limit, over ours
    with pytest.raises(ValueError, match=r"image declares 9000x9000 pixels, more than the 67108864 allowed"):
        decode_image(bomb, 1, None)
    with pytest.raises(ValueError, match=r"image is 9000x9000 L; the dataset holds 8x8 L"):
        decode_image(bomb, 1, SIDE)  # with the dataset's side, any other size is refused


def test_a_shard_whose_bytes_differ_from_the_manifest_is_bad_as_a_whole(ds, caplog):
    urls, _ = split_urls(str(ds), "train")
    shard = ds / "train-00001.tar"
    want = _manifest_entry(ds, shard.name)["sha256"]
    data = bytearray(shard.read_bytes())
    assert data[-1] == 0
    data[-1] = 1  # in the tar's end padding: every image still decodes, the size is the same
    shard.write_bytes(bytes(data))
    got = hashlib.sha256(bytes(data)).hexdigest()
    samples = read_shard(urls[1], **_bounded(ds, shard.name))
    with pytest.raises(ShardMismatch, match=f"its SHA-256 is {got}; the manifest lists {want}"):
        for i, _, _ in samples:
            assert i < PER_SHARD
    loader = train_loader(str(ds), 10, num_workers=0, shuffle_buffer=10, max_bad_fraction=0.5)
    for _ in range(7):  # the 3 shards of epoch 0 and into epoch 1
        next(loader)
    assert loader.bad_samples >= PER_SHARD  # every sample of it, though each image decoded
    assert f"skipped shard in {urls[1]}: ShardMismatch: its SHA-256 is {got}; the manifest lists {want}" in caplog.text
    strict = train_loader(str(ds), 10, num_workers=0, shuffle_buffer=10)
    with pytest.raises(RuntimeError, match=r"20 of the 60 samples of one pass over the split are lost"):
        for _ in range(7):
            next(strict)


def test_an_exact_pass_names_a_shard_whose_bytes_differ(ds):
    shard = ds / "val-00000.tar"
    data = bytearray(shard.read_bytes())
    data[-1] = 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"val-00000\.tar: shard unreadable in an exact pass: ShardMismatch: its SHA-256"):
        for _ in eval_loader(str(ds), "val", 8, num_workers=0):
            pass
