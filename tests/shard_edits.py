"""Tests that rewrite a built shard (a broken image, a foreign member) and record it in the
manifest as if it had been built so, leaving its content, not its hash, on trial."""
import hashlib
import io
import json
import tarfile
from pathlib import Path


def members(shard: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(shard: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def as_built(dataset: Path, shard: Path) -> None:
    """The shard's new size and SHA-256 written into the dataset's manifest."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    data = shard.read_bytes()
    for info in manifest["shards"]:
        if info["name"] == shard.name:
            info["bytes"], info["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def random_dataset(root: Path, images: int, side: int, per_shard: int, val: int):
    """Shards of `images` random RGB images (`val` of them held out), `per_shard` to a shard:
    the builder fixes samples per shard from the mean encoded size of the first 32 images."""
    import math

    import numpy as np

    from vdvae_dist.data.format import encode_image
    from vdvae_dist.data.shardwriter import TAR_MEMBER_OVERHEAD, build

    pixels = np.random.default_rng(0).integers(0, 256, (images, side, side, 3), dtype=np.uint8)
    np.savez(root / "src.npz", data=pixels)
    mean = sum(len(encode_image(img)) + TAR_MEMBER_OVERHEAD for img in pixels[:32]) / 32
    return build(f"npz:{root / 'src.npz'}", str(root / "ds"), side, val=val,
                 shard_bytes=math.ceil(per_shard * mean), progress=False)
