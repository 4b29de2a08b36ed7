"""A run's shard manifest as MLflow dataset inputs (the run's "Datasets" in the UI), one per
split it used: metadata only (name, digest, source, profile), no shard is read.

The digest comes from the manifest's per-shard SHA-256s, so two runs on the same bytes
show the same dataset version and a rebuilt split shows a new one. The source is the
shard URL without credentials, as MLflow's own source for its scheme (s3://, gs://, local
paths as file:// URIs, ...), or an fsspec source for schemes MLflow does not know.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

from ..artifacts.storage import redact, to_fs
from ..data.manifest import Manifest

DIGEST_CHARS = 12  # MLflow stores up to 36 and shows short digests best


class FsspecDatasetSource(DatasetSource):
    """Shards on a filesystem MLflow has no dataset source for (any fsspec URL)."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "fsspec"

    def load(self, dst_path: str | None = None) -> str:
        """Copies the shards and manifest into dst_path (a new folder by default)."""
        dst = dst_path or tempfile.mkdtemp()
        fs, root = to_fs(self.uri)
        fs.get(root.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
        return dst

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and "://" in raw_source

    @classmethod
    def _resolve(cls, raw_source: Any) -> "FsspecDatasetSource":
        return cls(raw_source)

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "FsspecDatasetSource":
        return cls(source_dict["uri"])


class ShardDataset(MetaDataset):
    """One split of a shard manifest: MetaDataset plus a profile (images, shards, bytes)."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_digest(manifest: Manifest, split: str) -> str:
    shards = sorted((s.name, s.samples, s.sha256) for s in manifest.shards_of(split))
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:DIGEST_CHARS]


def dataset_source(url: str) -> DatasetSource:
    """MLflow's source for the URL's scheme (redacted), else an fsspec one."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    shown = redact(url) if "://" in url else Path(url).resolve().as_uri()
    with warnings.catch_warnings():  # file:// matches MLflow's local source twice ("" and "file"): same class
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        try:
            return resolve_dataset_source(shown)
        except MlflowException:  # a scheme without an MLflow artifact repository (memory://, az://, ...)
            return FsspecDatasetSource(shown)


def shard_dataset(manifest: Manifest, url: str, split: str) -> ShardDataset:
    shards = manifest.shards_of(split)
    profile = {"split": split, "images": manifest.splits.get(split, 0), "shards": len(shards),
               "bytes": sum(s.bytes for s in shards), "resolution": manifest.resolution,
               "channels": manifest.channels, "bits": manifest.bits, "image_format": manifest.image_format}
    return ShardDataset(dataset_source(url), redact(manifest.dataset), split_digest(manifest, split), profile)
