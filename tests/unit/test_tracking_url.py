"""The training loop prints the MLflow run's address without credentials, whatever the
tracker hands it (the worker's console reaches the driver, Ray's logs and MLflow's logs/)."""
import torch

from vdvae_dist.artifacts.run_folder import LocalCheckpoints
from vdvae_dist.config import load
from vdvae_dist.tracking import NullTracker
from vdvae_dist.train.init import initial_model
from vdvae_dist.train.loop import Trainer
from vdvae_dist.train.torch_rule import TorchRule


class TrackerWithSecretUrl(NullTracker):
    """A tracker whose run URL still carries a password (as a server URL with user:pass@)."""
    run_id = "0123456789abcdef"
    url = "http://alice:s3cret@mlflow.internal:5000/#/experiments/1/runs/0123456789abcdef"


def test_the_loop_never_prints_a_tracking_urls_credentials(tmp_path):
    cfg = load("tiny", overrides=["optim.total_steps=1", "train.checkpoint_every=0", "train.log_every=1",
                                  "optim.batch_size=4", "train.grid_samples=4", "data.crops_per_image=2",
                                  "engine.precision=fp32", "data.val_fraction=0", f"train.output={tmp_path}"])
    said = []
    rule = TorchRule(initial_model(cfg), cfg, torch.device("cpu"))
    summary = Trainer(cfg, rule, LocalCheckpoints.of_run(str(tmp_path), 1), lambda _run: TrackerWithSecretUrl(),
                      log=lambda *parts: said.append(" ".join(map(str, parts)))).run()
    assert "MLflow run: http://***@mlflow.internal:5000/#***" in said
    assert not [line for line in said if "s3cret" in line] and "s3cret" not in str(summary)
