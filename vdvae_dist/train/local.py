"""`vdvae-dist train`: the training loop in this process (one CPU or one GPU), with the
plain-torch update rule and checkpoints in train.output/checkpoints."""
from __future__ import annotations

import dataclasses

import torch

from ..artifacts import output_lock
from ..artifacts.run_folder import LocalCheckpoints
from ..artifacts.storage import redact, use_run_storage
from ..config import RunConfig
from ..data.shardwriter import ensure_shards
from ..tracking import NullTracker, make_tracker
from .init import initial_model
from .loop import Trainer
from .torch_rule import TorchRule


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but no CUDA device is visible; allowed here: auto | cpu")
    return torch.device(name)


def with_local_output(cfg: RunConfig) -> RunConfig:
    """This process writes its run folder with local file operations: train.output must be a
    path (or file:// URL); an s3:// one would become a folder named 's3:' here."""
    out = cfg.train.output
    if out.startswith("file://"):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output=out[len("file://"):]))
    if "://" in out:
        raise ValueError(f"train.output={redact(out)!r} is out of range for one process (`vdvae-dist train`); "
                         "allowed: a local path or file:// URL (object storage: `vdvae-dist launch` or jobs/train.py, "
                         "whose Ray workers write there)")
    return cfg


def train_local(cfg: RunConfig, resume: bool = True, log=print, track: bool = False) -> dict:
    """Train in this process; with `track`, into MLflow like a Ray run (`vdvae-dist train`
    does; library callers such as tests and benchmarks opt in)."""
    cfg = with_local_output(cfg)
    with output_lock.locked(cfg.train.output, log):  # a second run into this output is refused
        return _train(cfg, resume, log, track)


def _train(cfg: RunConfig, resume: bool, log, track: bool) -> dict:
    use_run_storage(cfg)
    if cfg.data.shards and cfg.data.source:  # shards from the source, built once before reading
        ensure_shards(cfg.data, cfg.train.seed, log)
    rule = TorchRule(initial_model(cfg), cfg, pick_device(cfg.engine.device))
    store = LocalCheckpoints.of_run(cfg.train.output, cfg.train.keep_checkpoints, resume, log)
    tracker = (lambda run_id: make_tracker(cfg, 0, run_id)) if track else (lambda _run_id: NullTracker())
    return Trainer(cfg, rule, store, tracker, log=log).run()
