"""A logged pyfunc model as a training run leaves it, without training: the tiny preset's
initial weights exported (ema_fp32.pt) and logged by the run tracker to an MLflow store in a
folder, then downloaded as the model folder `mlflow models serve` and load_model read."""
from __future__ import annotations

from pathlib import Path

import torch

# one request set, predicted in the test process and in the fresh environment alike
REQUESTS = {"n": [2, 1], "temperature": [0.5, 1.0], "seed": [3, 4]}
PREDICT_SCRIPT = Path(__file__).with_name("pyfunc_predict.py")


def log_tiny_model(root: Path) -> dict:
    """{"model_dir", "model_uri", "tracking_uri", "export"} of a freshly logged tiny model."""
    import mlflow.artifacts

    from vdvae_dist.artifacts.run_folder import EXPORT_NAME
    from vdvae_dist.artifacts.weights import save_export
    from vdvae_dist.config import load
    from vdvae_dist.model import build_model
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load("tiny", overrides=[f"tracking.uri={uri}", "tracking.experiment=pyfunc-model",
                                  f"train.output={root / 'run'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    export = root / EXPORT_NAME
    save_export(export, cfg, model.state_dict(), step=1)
    tracker = MlflowTracker(cfg)
    logged = tracker.log_model(str(export), tuple(model.data_shape), step=1)
    tracker.finish()
    assert logged, "the tracker could not log the model"
    local = mlflow.artifacts.download_artifacts(artifact_uri=logged["model"], tracking_uri=uri,
                                                dst_path=str(root / "downloaded"))
    return {"model_dir": Path(local), "model_uri": logged["model"], "tracking_uri": uri, "export": export}
