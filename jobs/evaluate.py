"""Evaluation job: exact pass (every image once) with a run's EMA weights.

    ray job submit --working-dir . -- python jobs/evaluate.py --weights s3://bucket/runs/ffhq256 --split val
"""
import sys

from vdvae_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
