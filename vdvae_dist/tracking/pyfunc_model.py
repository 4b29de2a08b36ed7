"""The EMA weights as an MLflow 3 logged model: an `mlflow.pyfunc` model that samples images.

Why pyfunc and not `mlflow.pytorch`: `mlflow.pytorch` pickles the whole nn.Module (or
needs its class importable under the pickled name) and `load_model` unpickles it, which runs
arbitrary code and breaks whenever the model code moves. Here the model's only data is the
run's own `ema_fp32.pt` export (config + fp32 state dict), read with the weights-only loader
used by evaluation and serving (`artifacts/weights.py`). The Python side is logged
"from code" (`pyfunc_entry.py`): nothing at all is pickled. The model carries the vdvae_dist
package itself (MLflow's code_paths: `code/vdvae_dist` in the model, put on sys.path when it
loads), and its requirements.txt pins what loading and predicting import, at the versions
the run used: it loads and predicts in a fresh environment with only those installed
(`mlflow models serve -m models:/<id>`, or `--env-manager local` where vdvae-dist is).

`predict` takes one row per request, columns `n` (images), optional `temperature` (default
1.0) and `seed` (default: random), as a DataFrame or a dict, and returns one uint8 array
(N, C, H, W) of all rows' images in order, the layout of the Serve app's `.npy` answers.
MLflow checks the input against the declared signature: `n` and `seed` are integers (a
DataFrame gives a seed to every row or to none: pandas turns an integer column with a gap
into floats, which MLflow refuses), `temperature` a float. As in the Serve app, a request
asks for at most serve.max_n images (from the run's config): `mlflow models serve` exposes
predict over HTTP.
"""
from __future__ import annotations

import math
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

WEIGHTS_KEY = "ema_weights"  # the export's name among the logged model's artifacts
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vdvae_dist: the model's code
# what loading and predicting import (this package's model, weights and config code; MLflow's
# pyfunc); a dependency the project declares for training or serving only is left out
MODEL_REQUIREMENTS = ("torch", "mlflow", "numpy", "pandas", "fsspec", "pydantic")


def requirements() -> list[str]:
    """MODEL_REQUIREMENTS pinned to the versions installed here (torch without its local build
    tag, e.g. +cpu or +cu128: the environment that serves the model picks its own build)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def signature(data_shape_CHW: tuple[int, int, int]):
    """Requests in, uint8 images out; declared so MLflow need not run the model to infer it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "n"), ColSpec("double", "temperature", required=False),
                     ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *data_shape_CHW))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _present(value) -> bool:
    """A missing optional cell arrives as None or NaN (pandas fills absent values so)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def requests_of(model_input) -> list[tuple[int, float, int | None]]:
    """(n, temperature, seed) per row of a DataFrame or a dict of scalars or lists."""
    frame = model_input
    if not isinstance(frame, pd.DataFrame):  # {"n": [2, 1]} is two requests, {"n": 2} one
        frame = pd.DataFrame(frame if _has_lists(frame) else [frame])
    if "n" not in frame.columns:
        raise ValueError(f"input needs a column n (images per request); got {sorted(frame.columns)}")
    rows = []
    for row in frame.to_dict("records"):
        temperature, seed = row.get("temperature"), row.get("seed")
        rows.append((int(row["n"]), float(temperature) if _present(temperature) else 1.0,
                     int(seed) if _present(seed) else None))
    return rows


def _has_lists(data: dict) -> bool:
    return any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in data.values())


class EmaSampler(mlflow.pyfunc.PythonModel):
    """Samples from the EMA weights of a finished run (see the module docstring)."""

    def load_context(self, context) -> None:
        from ..artifacts.weights import load_weights

        self.weights = load_weights(context.artifacts[WEIGHTS_KEY])  # weights-only, on the CPU

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        # MLflow hands over a DataFrame checked against the signature (a dict becomes one row)
        requests = requests_of(model_input)
        limit = self.weights.cfg.serve.max_n
        for n, _, _ in requests:
            if not 1 <= n <= limit:
                raise ValueError(f"n={n} is out of range; allowed: 1..{limit} (serve.max_n of the run's config)")
        with torch.no_grad():  # sample_batch: one forward pass, each request seeded on its own
            images = self.weights.model.sample_batch(requests)
        return torch.cat(images).cpu().numpy()
