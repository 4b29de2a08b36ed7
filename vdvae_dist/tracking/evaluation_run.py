"""An evaluation as an MLflow run nested under the training run: metrics, the figures as
step images (at the weights' step) and the summary as JSON, so the MLflow UI shows them beside training."""
from __future__ import annotations

import json
import os

import numpy as np

from ..artifacts.run_folder import SUMMARY_FILE
from ..artifacts.storage import join, redact, to_fs
from ..artifacts.weights import MLFLOW_SCHEMES
from .mlflow_tracker import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND_TAG, default_uri


def training_run_id(weights_uri: str) -> str | None:
    """The MLflow run that trained these weights, from the run output's summary.json (a run
    folder, or its ema_fp32.pt); None for checkpoints and other exports."""
    folder = weights_uri.rstrip("/")
    if folder.endswith(".pt"):
        folder = folder.rsplit("/", 1)[0] if "/" in folder else "."
    if folder.startswith(MLFLOW_SCHEMES):
        return None
    fs, path = to_fs(join(folder, SUMMARY_FILE))
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path)).get("mlflow_run_id")


def tracking_uri(explicit: str | None, configured: str) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the training config's (unless it was
    stored redacted), else the embedded local store."""
    for uri in (explicit, os.environ.get("MLFLOW_TRACKING_URI"), configured):
        if uri and "***@" not in uri:
            return uri
    return default_uri()[0]


def metrics_of(summary: dict) -> dict[str, float]:
    """The summary's numbers as flat MLflow metric names."""
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for bound in ("elbo", "iwae", "active_elbo"):
        flat.update({f"{bound}_{k}": v for k, v in summary[bound].items()})
    flat.update({f"depth_{d}_bits_per_dim": v for d, v in summary["depth_bits_per_dim"].items()})
    flat.update({f"kl_group_{g:02d}_nats": v for g, v in enumerate(summary["kl_per_group_nats"])})
    return {k: float(v) for k, v in flat.items() if v == v}  # NaN (e.g. a standard error of 1 image) left out


def record(summary: dict, figures: dict[str, np.ndarray], uri: str, experiment: str, parent_run_id: str | None) -> str:
    """Log an evaluation (evaluation/report.py's summary and figures) as a run, nested under
    parent_run_id when known; its run id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else mlflow.create_experiment(
            experiment, tags={EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT})
    s = summary
    tags = {"vdvae.run_kind": "evaluation", "vdvae.split": s["split"], "vdvae.weights": redact(s["weights"])}
    if parent_run_id:
        tags["vdvae.training_run"] = parent_run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate-{s['split']}-step{s['step']}",
                          parent_run_id=parent_run_id, tags=tags) as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in s["settings"].items()})
        mlflow.log_metrics(metrics_of(s), step=int(s["step"]))
        for name, image in figures.items():  # step images: the UI's slider compares evaluations over steps
            mlflow.log_image(image, key=f"evaluation/{name.removesuffix('.png')}", step=int(s["step"]))
        mlflow.log_dict(s, f"evaluation/{SUMMARY_FILE}")
        return run.info.run_id
