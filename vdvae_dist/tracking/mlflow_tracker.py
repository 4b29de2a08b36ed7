"""MLflow tracking. The embedded default is a local sqlite store with an explicit artifact
folder under the working directory (`mlruns/`); MLFLOW_TRACKING_URI or tracking.uri
point at a tracking server. Credentials never reach params, tags or printed URLs: every
value passes through artifacts.storage.redact."""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from ..artifacts.storage import redact, redact_all
from ..config import RunConfig, flatten

log = logging.getLogger(__name__)


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


def resolve_uri(cfg: RunConfig, fallback: str | None = None) -> str:
    """The tracking URI as seen by the process that logs: tracking.uri, else this
    process's MLFLOW_TRACKING_URI (a secret may be mounted on the workers only), else the
    driver's embedded default passed along, else an embedded store here."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or fallback or default_uri()[0]


class MlflowTracker:
    """MLflow from rank 0. An unreachable tracking server never stops training: metrics are
    sent asynchronously, everything else is retried a few times, then logged as a warning."""

    attempts = 3

    def __init__(self, cfg: RunConfig, run_id: str | None = None, world: int = 1, extra_tags: dict | None = None,
                 fallback_uri: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.dropped = 0  # calls given up after all attempts
        uri = resolve_uri(cfg, fallback_uri)
        artifact_location = None
        if uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside the database
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
        self.url = redact(f"{base}/#/experiments/{self.run.info.experiment_id}/runs/{self.run_id}" if base else
                          f"mlflow ui --backend-store-uri {uri}  (run {self.run_id})")
        if run_id is None:  # a resumed run keeps the params it started with
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

            # the client splits large batches itself; values longer than its limit are refused
            mlflow.log_params({k: redact(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(cfg).items()})
            import torch

            tags = {"world_size": str(world), "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
            tags.update(extra_tags or {})
            mlflow.set_tags(redact_all(tags))

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                fn(*args, **kwargs)
                return
            except Exception as e:  # any client or transport error: training goes on
                if attempt == self.attempts:
                    self.dropped += 1
                    log.warning("MLflow %s failed %d times, skipped (training continues): %s", what, attempt,
                                redact(str(e)))
                    return
                time.sleep(2.0 ** attempt)

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        # asynchronous: a slow or unreachable server delays MLflow's queue, not the training step
        self._call("log_metrics", self.mlflow.log_metrics, clean, step=step, synchronous=False)

    def log_image(self, image_HWC: np.ndarray, name: str) -> None:
        self._call(f"log_image {name}", self.mlflow.log_image, image_HWC, name)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call(f"log_artifact {Path(path).name}", self.mlflow.log_artifact, path, artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._call(f"log_dict {artifact_file}", self.mlflow.log_dict, redact_all(data), artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("end_run", self.mlflow.end_run, status)


def make_tracker(cfg: RunConfig, rank: int, run_id: str | None = None, world: int = 1, extra_tags=None,
                 fallback_uri: str | None = None):
    """MLflow on rank 0, nothing elsewhere."""
    if rank != 0:
        return NullTracker()
    return MlflowTracker(cfg, run_id, world, extra_tags, fallback_uri)
