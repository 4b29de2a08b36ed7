"""`vdvae-dist import` from and to a real S3-protocol server (moto) over HTTP."""
from pathlib import Path

import boto3
import pytest

from vdvae_dist.official.importer import import_checkpoint
from vdvae_dist.artifacts.weights import load_weights

pytestmark = pytest.mark.integration
CASE = Path(__file__).resolve().parents[1] / "reference" / "vdvae-cifar10"


def test_import_reads_and_writes_s3(s3_bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(CASE / "checkpoint.pt"), s3_bucket, "official/model-ema.th")
    r = import_checkpoint("vdvae", f"s3://{s3_bucket}/official/model-ema.th", f"s3://{s3_bucket}/imported",
                          hparams=str(CASE / "hparams.json"))
    assert r.out == f"s3://{s3_bucket}/imported/ema_fp32.pt" and r.weights == "ema"
    w = load_weights(f"s3://{s3_bucket}/imported")
    assert w.cfg.model.design == "original" and w.model.num_groups == 43


def test_import_refuses_a_missing_bucket_without_creating_it(s3_server, s3_bucket, tmp_path):
    with pytest.raises(ValueError, match="bucket 'no-such-bucket-z' does not exist"):
        import_checkpoint("vdvae", str(CASE / "checkpoint.pt"), "s3://no-such-bucket-z/out",
                          hparams=str(CASE / "hparams.json"))
    names = [b["Name"] for b in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]]
    assert "no-such-bucket-z" not in names
