"""MLflow tracking. The embedded default is a local sqlite store with an explicit artifact
folder under the working directory (`mlruns/`); MLFLOW_TRACKING_URI or tracking.uri
point at a tracking server. Credentials never reach params or tags: params come from the
typed config, which holds none."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import RunConfig, flatten


class Tracker(Protocol):
    run_id: str | None
    url: str | None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_image(self, image_HWC: np.ndarray, name: str) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None
    url = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        return None

    def log_image(self, image_HWC: np.ndarray, name: str) -> None:
        return None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        return None

    def log_dict(self, data: dict, artifact_file: str) -> None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        return None


def default_uri(root: str | Path = "mlruns") -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded local store."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


class MlflowTracker:
    def __init__(self, cfg: RunConfig, run_id: str | None = None, world: int = 1, extra_tags: dict | None = None):
        import mlflow

        self.mlflow = mlflow
        uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        artifact_location = None
        if not uri:
            uri, artifact_location = default_uri()
        elif uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside the database
            artifact_location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location))
        self.run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                                    run_name=None if run_id else Path(cfg.train.output.rstrip("/")).name,
                                    log_system_metrics=True)
        self.run_id = self.run.info.run_id
        base = uri.rstrip("/") if uri.startswith("http") else None
        self.url = f"{base}/#/experiments/{self.run.info.experiment_id}/runs/{self.run_id}" if base else \
            f"mlflow ui --backend-store-uri {uri}  (run {self.run_id})"
        if run_id is None:  # a resumed run keeps the params it started with
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

            # the client splits large batches itself; values longer than its limit are refused
            mlflow.log_params({k: v[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(cfg).items()})
            import torch

            tags = {"world_size": str(world), "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
            tags.update(extra_tags or {})
            mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        self.mlflow.log_metrics(clean, step=step)

    def log_image(self, image_HWC: np.ndarray, name: str) -> None:
        self.mlflow.log_image(image_HWC, name)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(path, artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.mlflow.log_dict(data, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status)


def make_tracker(cfg: RunConfig, rank: int, run_id: str | None = None, world: int = 1, extra_tags=None):
    """MLflow on rank 0, nothing elsewhere."""
    if rank != 0:
        return NullTracker()
    return MlflowTracker(cfg, run_id, world, extra_tags)
