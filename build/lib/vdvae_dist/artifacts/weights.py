"""Trained EMA weights by URI, for evaluation and serving.

An export (`ema_fp32.pt`) is `{"config", "ema", "step"}` plus optional "metrics"; every
checkpoint folder, every run output and the run's MLflow model hold one. Accepted URIs:
a local path, `file://`, `s3://`, `gs://` (the file, or a folder holding it, or a local
checkpoints folder through its `latest` pointer). MLflow URIs (`runs:/`, `models:/`,
`mlflow-artifacts:`) are resolved by tracking/logged_weights.py, which hands the bytes here.
Loading is weights-only: no arbitrary unpickling.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import RunConfig, from_dict, to_dict
from ..model import build_model
from .run_folder import EXPORT_NAME, POINTER
from .storage import join, redact, redact_all, storage_errors, to_fs

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")


def export_dict(cfg_dict: dict, ema: dict[str, torch.Tensor], step: int, metrics: dict | None = None) -> dict:
    return {"config": cfg_dict, "ema": ema, "step": int(step), "metrics": dict(metrics or {})}


def save_export(path, cfg: RunConfig, ema: dict[str, torch.Tensor], step: int,
                metrics: dict | None = None) -> None:
    """Write the export of a run's EMA weights to `path` (a path or a binary file): fp32 tensors on the CPU and the config,
    its URLs without credentials (the run reads its own from its config, not from here)."""
    ema = {k: v.detach().cpu() for k, v in ema.items()}
    torch.save(export_dict(redact_all(to_dict(cfg)), ema, step, metrics), path)


@dataclass
class Weights:
    model: nn.Module  # in eval mode, on the CPU
    cfg: RunConfig
    step: int
    source: str
    metrics: dict = field(default_factory=dict)


def _read_bytes(uri: str) -> tuple[bytes, str]:
    """The export's bytes and the URI they came from."""
    if uri.startswith(MLFLOW_SCHEMES):
        raise ValueError(f"model URI {redact(uri)!r} is an MLflow URI: load it with "
                         "vdvae_dist.tracking.logged_weights.load_weights")
    fs, path = to_fs(uri)
    with storage_errors(uri):
        if fs.isdir(path):
            name = EXPORT_NAME
            latest = join(path, POINTER)  # a single-process trainer's checkpoints folder
            if not fs.exists(join(path, name)) and fs.exists(latest):
                name = join(fs.cat_file(latest).decode().strip(), EXPORT_NAME)
            uri, path = join(uri, name), join(path, name)
        if not fs.isfile(path):
            raise ValueError(f"model URI {redact(uri)!r} does not exist; allowed: an {EXPORT_NAME} (or a folder holding "
                             "one) on a path, file://, s3:// or gs://, or an MLflow runs:/ or models:/ URI")
        return fs.cat_file(path), uri


def load_weights(uri: str) -> Weights:
    """The export at uri; errors and Weights.source show the URI without credentials."""
    return weights_from_bytes(*_read_bytes(uri))


def weights_from_bytes(data: bytes, source: str) -> Weights:
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
