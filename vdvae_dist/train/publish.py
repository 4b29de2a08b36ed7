"""What a training run publishes besides its checkpoints: which data it saw (at the start),
sample grids and held-out bounds (during), and at the end the exported weights and the sample
grid (first, so that a failing evaluation never loses them), the exact held-out pass with the
EMA weights, then the export again with its scores, the figures and summary.json, to
train.output and to MLflow. Rank 0 writes; the evaluation pass and the EMA gather are
collectives."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..artifacts.images import READABLE_SIDE, grid, save_grid
from ..artifacts.run_folder import EXPORT_NAME, METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE
from ..artifacts.storage import join, redact, redact_all, to_fs, write_atomic
from ..artifacts.weights import save_export
from ..config import RunConfig
from ..evaluation.latents import Utilisation
from ..evaluation.measures import Measures, all_reduce, measure
from ..evaluation.report import TEMPERATURES, default_depths, evaluation_figures
from ..model import bits_per_dim, build_model
from ..tracking import Tracker

# the end-of-run figures as MLflow step images (evaluation_figures' names -> image keys)
FIGURE_KEYS = {"reconstructions_by_depth.png": "reconstructions/by_depth", "kl_by_group.png": "evaluation/kl_by_group",
               "kl_cumulative.png": "evaluation/kl_cumulative",
               "samples_by_temperature.png": "evaluation/samples_by_temperature"}
SAMPLES_KEY = "samples"  # the sample grids, one per tracking.image_every steps and one at the end


def record_data(tracker: Tracker, cfg: RunConfig, eval_split: str) -> None:
    """Once per run: the shards' manifest and the splits as the run's dataset inputs."""
    from ..data.manifest import manifest_dict, read_manifest

    manifest = read_manifest(cfg.data.shards)
    tracker.log_dict(manifest_dict(manifest), "data/manifest.json")
    tracker.log_dataset(manifest, cfg.data.shards, "train", "training")
    tracker.log_dataset(manifest, cfg.data.shards, eval_split, "evaluation")


def ema_model(cfg: RunConfig, weights: dict[str, torch.Tensor], device: torch.device):
    """The EMA weights in a plain model on `device`, in eval mode."""
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    return model.to(device).eval()


def grid_samples(cfg: RunConfig, model) -> torch.Tensor:
    """train.grid_samples images at train.grid_temperature, the same seed every time; for a
    Bernoulli likelihood the pixel probabilities (a draw of binary pixels is mostly noise)."""
    c = cfg.train
    return model.sample(c.grid_samples, c.grid_temperature, seed=c.seed, probabilities=True).cpu()


def log_samples(tracker: Tracker, cfg: RunConfig, model, step: int) -> None:
    tracker.log_image(grid(grid_samples(cfg, model), min_side=READABLE_SIDE), SAMPLES_KEY, step)


class EvaluationFailed(RuntimeError):
    """The held-out pass failed on some rank (a bad held-out image, unreadable shard): raised
    on every rank together. A retry would read the same images: not worth Ray's retries."""


def _agree_on_failure(error: str | None, rank: int) -> None:
    """Collective: every rank learns whether any rank's pass failed, so none is left waiting
    in the reduction for a rank that raised."""
    errors = [error]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        raise EvaluationFailed(redact("the held-out evaluation failed (" + "; ".join(failed) + ")"))


def held_out_pass(cfg: RunConfig, rule, data, model, rank: int, world: int) -> Measures:
    """Collective: the exact ELBO pass of `model` (the EMA weights), every rank over its
    share of the held-out images, the totals on every rank. EvaluationFailed on every rank
    when it failed on one."""
    error = None
    try:
        passed = measure(model, data.eval_pass(max(1, cfg.optim.batch_size // world)), seed=cfg.train.seed,
                         share=rank, bf16=rule.bf16)
    except Exception as e:  # any reading or decoding error of this rank's share
        error = f"{type(e).__name__}: {e}"
    _agree_on_failure(error, rank)
    passed = all_reduce(passed, rule.device)
    if passed.elbo.count == 0:
        raise ValueError("the evaluation pass saw no images")
    return passed


def log_held_out(tracker: Tracker, cfg: RunConfig, rule, data, rank: int, world: int) -> dict:
    """Collective (train.eval_every): the held-out bound of the current EMA weights, logged
    as eval/* metrics at this step; the row."""
    model = ema_model(cfg, rule.ema_weights(), rule.device)
    passed = held_out_pass(cfg, rule, data, model, rank, world)
    nats = passed.elbo.mean
    row = {"eval/bits_per_dim": bits_per_dim(nats, int(np.prod(model.data_shape))), "eval/nats_per_image": nats}
    tracker.log_metrics(row, step=rule.step)
    return row


def publish(cfg: RunConfig, rule, data, tracker: Tracker, last_checkpoint: str | None, *, rank: int, world: int,
            summary_extra: dict, log: Callable[..., None]) -> dict:
    """Exact pass with the EMA weights over every rank's share; rank 0 writes the weights,
    the sample grid and summary.json to train.output and logs them to MLflow. Returns the
    summary on rank 0, {} elsewhere."""
    weights = rule.ema_weights()  # collective
    model = ema_model(cfg, weights, rule.device)
    out = cfg.train.output.rstrip("/")
    fs, root = to_fs(out)
    samples = grid_samples(cfg, model) if rank == 0 else None
    if rank == 0:  # before the evaluation: whatever happens to it, the run's weights are published
        with tempfile.TemporaryDirectory() as tmp:
            save_export(Path(tmp) / EXPORT_NAME, cfg, weights, rule.step)
            save_grid(samples, Path(tmp) / SAMPLES_FILE, min_side=READABLE_SIDE)
            for name in (EXPORT_NAME, SAMPLES_FILE):
                write_atomic(fs, join(root, name), (Path(tmp) / name).read_bytes())
    try:
        passed = held_out_pass(cfg, rule, data, model, rank, world) if data.n_eval else None  # none: val_fraction = 0
    except EvaluationFailed as e:
        if rank == 0:
            log(redact(f"{e}; the EMA weights are published without scores in {join(out, EXPORT_NAME)}"))
        raise
    nats = passed.elbo.mean if passed else None
    summary: dict = {}
    if rank == 0:
        scores = {"test_bits_per_dim": bits_per_dim(nats, int(np.prod(model.data_shape))) if passed else None,
                  "test_nats_per_image": nats, "eval_split": data.eval_split,
                  "eval_images": passed.elbo.count if passed else 0}
        summary = {"step": rule.step, "skipped": rule.skipped, **scores, "samples": join(out, SAMPLES_FILE),
                   "weights": join(out, EXPORT_NAME), "checkpoint": last_checkpoint, "world": world,
                   "mlflow_run_url": tracker.url, "mlflow_run_id": tracker.run_id, **summary_extra}
        if "://" not in out:
            summary["metrics"] = join(out, METRICS_FILE)
        with tempfile.TemporaryDirectory() as tmp:  # written locally, then published to the output URL
            save_export(Path(tmp) / EXPORT_NAME, cfg, weights, rule.step, scores)  # again, now with its scores
            write_atomic(fs, join(root, EXPORT_NAME), (Path(tmp) / EXPORT_NAME).read_bytes())
            if tracker.run_id is not None and passed:
                tracker.log_metrics({"test_bits_per_dim": scores["test_bits_per_dim"], "test_nats_per_image": nats},
                                    step=rule.step)
            if tracker.run_id is not None:
                tracker.log_image(grid(samples, min_side=READABLE_SIDE), SAMPLES_KEY, rule.step)
            if tracker.run_id is not None and passed:
                try:  # figures are extras: a plotting failure must not stop the publish
                    util = Utilisation.from_sums(passed.channel_kl, model.group_shapes, passed.elbo.count)
                    images = next(iter(data.eval_pass(4)))[:4].to(rule.device)
                    figures = evaluation_figures(model, util, images, default_depths(model.num_groups), TEMPERATURES,
                                                 4, cfg.train.seed)
                    for name, image in figures.items():
                        tracker.log_image(image, FIGURE_KEYS[name], rule.step)
                    tracker.log_metrics({"active_fraction": util.active_fraction}, step=rule.step)
                except Exception as e:
                    log(f"warning: evaluation figures skipped ({type(e).__name__}: {e})")
            if tracker.run_id is not None:
                tracker.log_artifact(str(Path(tmp) / EXPORT_NAME), "model")  # plain fp32 EMA weights + config
                # the same export as the run's logged model (and registered model): its models:/ URIs
                logged = tracker.log_model(str(Path(tmp) / EXPORT_NAME), tuple(model.data_shape), rule.step)
                summary.update({f"mlflow_{kind}_uri": uri for kind, uri in logged.items()})
            summary = redact_all(summary)
            Path(tmp, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            write_atomic(fs, join(root, SUMMARY_FILE), Path(tmp, SUMMARY_FILE).read_bytes())
            if tracker.run_id is not None:
                tracker.log_artifact(str(Path(tmp) / SUMMARY_FILE))
        tracker.finish()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return summary
