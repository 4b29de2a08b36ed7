"""EMA weights by any URI a user may hold, MLflow's included: `runs:/<run id>/model/ema_fp32.pt`,
`mlflow-artifacts:/...`, and the run's logged or registered model (`models:/<model id>`,
`models:/NAME/latest`, `models:/NAME/3`), whose `ema_fp32.pt` is found through the model's
MLmodel file. Every other URI goes to artifacts/weights.py as it is."""
from __future__ import annotations

from pathlib import Path

from ..artifacts.run_folder import EXPORT_NAME
from ..artifacts.storage import redact
from ..artifacts.weights import MLFLOW_SCHEMES, Weights, weights_from_bytes
from ..artifacts.weights import load_weights as load_stored_weights


def _in_mlflow_model(folder: Path) -> Path:
    """The export inside a downloaded MLflow model (the pyfunc flavor's artifacts, see
    pyfunc_model.py), or folder/ema_fp32.pt when the folder is no MLflow model."""
    if not (folder / "MLmodel").is_file():
        return folder / EXPORT_NAME
    from mlflow.models import Model

    flavor = Model.load(str(folder)).flavors.get("python_function", {})
    paths = [entry["path"] for entry in flavor.get("artifacts", {}).values()]
    found = [p for p in paths if Path(p).name == EXPORT_NAME]
    return folder / found[0] if found else folder / EXPORT_NAME


def load_weights(uri: str, tracking_uri: str | None = None) -> Weights:
    """The export at uri (a storage URI or an MLflow one, resolved against `tracking_uri`,
    else MLflow's own default); errors and Weights.source show the URI without credentials."""
    if not uri.startswith(MLFLOW_SCHEMES):
        return load_stored_weights(uri)
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri,
                                                     registry_uri=tracking_uri))
    path = _in_mlflow_model(local) if local.is_dir() else local
    if not path.is_file():
        raise ValueError(f"model URI {redact(uri)!r}: no {EXPORT_NAME} there")
    return weights_from_bytes(path.read_bytes(), uri)
