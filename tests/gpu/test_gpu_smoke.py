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


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_on_one_gpu_train_like_eager(tmp_path, mode):
    # reduce-overhead replays CUDA graphs of the launch-bound low-resolution blocks
    from vdvae_dist.model import build_model
    from vdvae_dist.train.torch_rule import TorchRule

    losses = {}
    for compile_mode in ("off", mode):
        torch.manual_seed(0)
        cfg = _cfg(tmp_path, "engine.device=cuda", "engine.precision=fp32", f"engine.compile={compile_mode}")
        rule = TorchRule(build_model(cfg.model), cfg, torch.device("cuda"))
        x = torch.randint(0, 256, (4, *rule.module.data_shape), dtype=torch.uint8, device="cuda",
                          generator=torch.Generator("cuda").manual_seed(1)).contiguous(memory_format=torch.channels_last)
        for _ in range(3):  # graphs are recorded after warm-up calls
            torch.manual_seed(2)
            loss = rule.forward(x).nelbo.mean()
            loss.backward()
            rule.module.zero_grad(set_to_none=True)
        losses[compile_mode] = loss.item()
        assert rule.compiled is None or rule.compiled.failure is None, rule.compiled.failure
    assert losses[mode] == pytest.approx(losses["off"], rel=1e-4)


def test_the_mlflow_run_records_gpu_system_metrics(tmp_path, monkeypatch):
    import mlflow

    from vdvae_dist.train.local import train_local

    # sample every second and log each sample: the run is a few seconds long
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    summary = train_local(_cfg(tmp_path, "engine.device=cuda"), log=lambda *_: None, track=True)
    metrics = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"]).data.metrics
    assert "system/gpu_0_memory_usage_megabytes" in metrics and "system/gpu_0_utilization_percentage" in metrics
