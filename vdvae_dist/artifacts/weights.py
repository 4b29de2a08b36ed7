"""Trained EMA weights by URI, for evaluation and serving.

An export (`ema_fp32.pt`) is `{"config", "ema", "step"}` plus optional "metrics"; every
checkpoint folder, every run output and the run's MLflow model hold one. Accepted URIs:
a local path, `file://`, `s3://`, `gs://` (the file, or a folder holding it), and MLflow
artifact URIs (`runs:/<run id>/model/ema_fp32.pt`, `mlflow-artifacts:/...`, and the run's
logged or registered model: `models:/<model id>`, `models:/NAME/latest`, `models:/NAME/3`,
whose `ema_fp32.pt` is found through the model's MLmodel file).
Loading is weights-only: no arbitrary unpickling.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import RunConfig, from_dict
from .storage import join, redact, storage_errors, to_fs
from ..model import build_model

EXPORT_NAME = "ema_fp32.pt"
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")


def export_dict(cfg_dict: dict, ema: dict[str, torch.Tensor], step: int, metrics: dict | None = None) -> dict:
    return {"config": cfg_dict, "ema": ema, "step": int(step), "metrics": dict(metrics or {})}


@dataclass
class Weights:
    model: nn.Module  # in eval mode, on the CPU
    cfg: RunConfig
    step: int
    source: str
    metrics: dict = field(default_factory=dict)


def _in_mlflow_model(folder: Path) -> Path:
    """The export inside a downloaded MLflow model (the pyfunc flavor's artifacts, see
    tracking/pyfunc_model.py), or folder/ema_fp32.pt when the folder is no MLflow model."""
    if not (folder / "MLmodel").is_file():
        return folder / EXPORT_NAME
    from mlflow.models import Model

    flavor = Model.load(str(folder)).flavors.get("python_function", {})
    paths = [entry["path"] for entry in flavor.get("artifacts", {}).values()]
    found = [p for p in paths if Path(p).name == EXPORT_NAME]
    return folder / found[0] if found else folder / EXPORT_NAME


def _read_bytes(uri: str) -> tuple[bytes, str]:
    """The export's bytes and the URI they came from."""
    if uri.startswith(_MLFLOW_SCHEMES):
        import mlflow.artifacts

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        path = _in_mlflow_model(local) if local.is_dir() else local
        if not path.is_file():
            raise ValueError(f"model URI {redact(uri)!r}: no {EXPORT_NAME} there")
        return path.read_bytes(), uri
    fs, path = to_fs(uri)
    with storage_errors(uri):
        if fs.isdir(path):
            name = EXPORT_NAME
            latest = join(path, "latest")  # a single-process trainer's checkpoints folder
            if not fs.exists(join(path, name)) and fs.exists(latest):
                name = join(fs.cat_file(latest).decode().strip(), EXPORT_NAME)
            uri, path = join(uri, name), join(path, name)
        if not fs.isfile(path):
            raise ValueError(f"model URI {redact(uri)!r} does not exist; allowed: an {EXPORT_NAME} (or a folder holding "
                             "one) on a path, file://, s3:// or gs://, or an MLflow runs:/ or models:/ URI")
        return fs.cat_file(path), uri


def load_weights(uri: str) -> Weights:
    """The export at uri; errors and Weights.source show the URI without credentials."""
    data, source = _read_bytes(uri)
    source = redact(source)
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than weights
        raise ValueError(f"model URI {source!r} is not a weights-only torch file: {e}") from e
    if not isinstance(saved, dict) or "config" not in saved or "ema" not in saved:
        raise ValueError(f"model URI {source!r} holds no EMA weights with their config "
                         f"(expected the keys config, ema, step)")
    cfg = from_dict(saved["config"])
    model = build_model(cfg.model)
    model.load_state_dict(saved["ema"])
    return Weights(model.eval(), cfg, int(saved.get("step", 0)), source, dict(saved.get("metrics") or {}))
