"""The manifest of a sharded dataset, read by the streaming side and written by the shard
builder (the one owner of the dataset layout).

A dataset at URL holds WebDataset tar shards `{split}-{index:05d}.tar`, `manifest.json`
(written last, so its presence means the shards are complete) and, while it is built,
`build-plan.json`. Sample keys are `{split}-{index:08d}`; `bits` in the manifest is the
depth the model should use (images are stored in 8 bit and the model reduces them)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..artifacts.storage import join, redact, require_bucket, storage_errors, to_fs

MANIFEST = "manifest.json"
BUILD_PLAN = "build-plan.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    dataset: str
    resolution: int
    channels: int
    bits: int
    image_format: str
    splits: dict[str, int]  # split -> number of samples
    shards: list[ShardInfo]
    command: str
    tool_version: str
    seed: int
    extra: dict = field(default_factory=dict)

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where} is not a valid vdvae-dist manifest: {e}") from None


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    fs, root = to_fs(url, storage_options)
    path, shown = join(root, MANIFEST), redact(url)
    with storage_errors(shown):
        if not is_http(fs):  # an http(s) URL has no bucket: its host is in the path
            require_bucket(fs, root, shown)
        if not fs.exists(path):
            raise ValueError(f"{shown}: no {MANIFEST} (build shards there with `vdvae-dist shards build`)")
        return Manifest.from_json(fs.cat_file(path).decode(), where=join(shown, MANIFEST))


def is_http(fs) -> bool:
    """Whether fs is fsspec's HTTP filesystem: read-only, without buckets."""
    return any(p in ("http", "https") for p in ([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol))


def manifest_dict(m: Manifest) -> dict:
    return asdict(m)
