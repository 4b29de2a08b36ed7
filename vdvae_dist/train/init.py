"""The network a run starts from: fresh (seeded) weights, or `train.init_from`'s weights
for both the raw and the EMA copy (fine-tuning a released or earlier checkpoint). Loaded
into the plain module before any update rule wraps it, so one path serves the torch rule
and every ZeRO stage (ZeRO-3 partitions what it is given)."""
from __future__ import annotations

import torch

from ..artifacts.storage import redact
from ..config import RunConfig
from ..model import ImageModel, build_model, misfit


def initial_model(cfg: RunConfig) -> ImageModel:
    """The model to train, its weights seeded by train.seed or taken from train.init_from."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    uri = cfg.train.init_from
    if not uri:
        return model
    from ..tracking.logged_weights import load_weights
    from ..tracking.mlflow_tracker import resolve_uri

    weights = load_weights(uri, resolve_uri(cfg))  # runs:/ and models:/ of this run's tracking server
    state = weights.model.state_dict()
    problem = misfit(state, model)
    if problem is not None:
        raise ValueError(f"train.init_from={redact(uri)!r} does not fit the model config: {problem}; train with the "
                         "config written beside the weights (vdvae-dist import writes config.toml, a run its "
                         "config.json)")
    model.load_state_dict(state)
    return model


def init_source_tags(uri: str) -> dict[str, str]:
    """MLflow tags linking a run to the weights it started from (the run, when they are an MLflow run's)."""
    if not uri:
        return {}
    tags = {"init_from": redact(uri)}
    if uri.startswith("runs:/"):
        tags["init_from_run"] = uri[len("runs:/"):].split("/", 1)[0]
    return tags
