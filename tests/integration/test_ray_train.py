"""Ray Train launches 2 DeepSpeed ZeRO workers on a local Ray cluster; shards streamed."""
import json
import os

import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.data.shardwriter import build

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_zero_workers_train_checkpoint_and_evaluate(local_ray, tmp_path, stage):
    from vdvae_dist.launch.ray_train import train_distributed

    shards = tmp_path / "shards"
    build("skimage:12", str(shards), 32, val=16, shard_bytes=30_000, progress=False)
    cfg = load("tiny", overrides=[f"engine.zero_stage={stage}", "scaling.workers=2", "optim.batch_size=8",
                                  "optim.total_steps=6", "train.checkpoint_every=3", "train.log_every=3",
                                  f"train.output={tmp_path / 'run'}", f"data.shards={shards}", "data.source=",
                                  "data.loader_workers=0", "data.shuffle_buffer=8", "train.grid_samples=4"])
    summary = train_distributed(cfg)
    assert summary["step"] == 6 and summary["world"] == 2 and summary["eval_images"] == 16
    assert 0 < summary["test_bits_per_dim"] < 12
    assert summary["checkpoint"] and os.path.isdir(summary["checkpoint"])
    files = os.listdir(summary["checkpoint"])
    assert {"ema-rank00000.pt", "ema-rank00001.pt", "data-rank00000.json", "data-rank00001.json"} <= set(files)
    saved = torch.load(tmp_path / "run" / "ema_fp32.pt", weights_only=True)
    from vdvae_dist.config import from_dict
    from vdvae_dist.model import build_model
    model = build_model(from_dict(saved["config"]).model)
    model.load_state_dict(saved["ema"])  # plain fp32 weights, strict
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 6
