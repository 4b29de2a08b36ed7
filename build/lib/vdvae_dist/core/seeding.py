"""Seeds of the latent noise, from a draw's position in the run only (never from what ran
before it), so that runs, resumes and evaluation passes are reproducible."""
from __future__ import annotations

import hashlib


def noise_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the latent noise for one micro-batch, from its global position only: with a
    fixed micro-batch size a run draws the same noise on any number of workers, and a
    resumed run the same noise as an uninterrupted one. Evaluation passes (evaluation/measures.py,
    at the end of a run and in `evaluate`) use step -2."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
