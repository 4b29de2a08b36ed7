"""One-GPU smoke tests for people running on GPUs (skipped where CUDA is absent, as on the
project's CI machines): the single-process trainer and one DeepSpeed worker under Ray
Train, both through the one training loop that places batches on the model's device."""
import math

import pytest
import torch

from vdvae_dist.config import load

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cfg(tmp_path, *extra):
    return load("tiny", overrides=["optim.total_steps=4", "optim.batch_size=4", "train.checkpoint_every=2",
                                   "train.log_every=2", "data.crops_per_image=4", "train.grid_samples=2",
                                   f"train.output={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                   *extra])


def test_single_process_training_on_one_gpu(tmp_path):
    from vdvae_dist.train.local import train_local

    summary = train_local(_cfg(tmp_path, "engine.device=cuda"), log=lambda *_: None)
    assert summary["step"] == 4 and math.isfinite(summary["test_bits_per_dim"])


def test_one_deepspeed_worker_on_one_gpu(tmp_path):
    import ray

    from vdvae_dist.launch.ray_train import train_distributed

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        summary = train_distributed(_cfg(tmp_path, "scaling.workers=1", "scaling.gpus_per_worker=1"))
    finally:
        ray.shutdown()
    assert summary["step"] == 4 and math.isfinite(summary["test_bits_per_dim"])
