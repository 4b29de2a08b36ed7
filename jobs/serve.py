"""Sampling service as a Ray job: deploys the Serve app on the cluster and keeps serving.

    ray job submit --working-dir . -- python jobs/serve.py --model s3://bucket/runs/ffhq256 \
        --host 0.0.0.0 --set serve.replicas=2 --set serve.gpus_per_replica=1

(With a Serve config file, cluster/serve.yaml, replicas and resources go in its
`deployments:` block instead: docs/serve.md.)
"""
import sys

from vdvae_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
