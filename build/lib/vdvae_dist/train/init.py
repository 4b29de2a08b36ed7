"""The network a run starts from: fresh (seeded) weights, or `train.init_from`'s weights
for both the raw and the EMA copy (fine-tuning a released or earlier checkpoint). Loaded
into the plain module before any update rule wraps it, so one path serves the torch rule
and every ZeRO stage (ZeRO-3 partitions what it is given)."""
from __future__ import annotations

from typing import Collection

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


def model_of_weights(cfg: RunConfig, explicit: Collection[str]) -> RunConfig:
    """With train.init_from: the model config of those weights, except the model fields the
    user set explicitly (in --config or --set), which are kept (and must still fit)."""
    if not cfg.train.init_from:
        return cfg
    from ..config import from_dict, to_dict
    from ..tracking.logged_weights import load_weights
    from ..tracking.mlflow_tracker import resolve_uri

    theirs = to_dict(load_weights(cfg.train.init_from, resolve_uri(cfg)).cfg)["model"]
    raw = to_dict(cfg)
    raw["model"] = {**theirs, **{k: v for k, v in raw["model"].items() if k in explicit}}
    return from_dict(raw)


def init_source_tags(uri: str) -> dict[str, str]:
    """MLflow tags linking a run to the weights it started from (the run, when they are an MLflow run's)."""
    if not uri:
        return {}
    tags = {"init_from": redact(uri)}
    if uri.startswith("runs:/"):
        tags["init_from_run"] = uri[len("runs:/"):].split("/", 1)[0]
    return tags
