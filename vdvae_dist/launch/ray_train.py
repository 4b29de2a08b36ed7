"""Build and run the Ray Train TorchTrainer for a RunConfig."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..artifacts import output_lock, run_folder
from ..artifacts.run_folder import (FAILURE_FILE, SUMMARY_FILE, check_resumable, latest_ray_checkpoint, ray_run_name,
                                    ray_storage_path)
from ..artifacts.storage import join, redact, redact_all, to_fs, use_run_storage
from ..config import RunConfig, to_dict
from ..core.ray_connect import init_ray
from ..data.shardwriter import ensure_shards
from ..engine.config import check_with_deepspeed
from ..tracking.mlflow_tracker import tag_checkpoint
from ..tracking.source import source_tags
from ..train.publish import EvaluationFailed
from ..train.rule import TrainingDiverged
from .cluster_tracking import workers_tracking_uri
from .quiet import quiet_deepspeed_logs, without_preemption_watcher_here


def worker_env(cfg: RunConfig) -> dict[str, str]:
    threads = str(max(1, int(cfg.scaling.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if cfg.scaling.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    return env


def _absolute(path: str) -> str:
    return path if (not path or "://" in path) else str(Path(path).resolve())


def prepare(cfg: RunConfig) -> RunConfig:
    """Driver-side set-up: local paths made absolute (workers do not run in the driver's
    working directory), engine.deepspeed checked by DeepSpeed's config reader, and the shards
    built once, before any worker reads them."""
    quiet_deepspeed_logs()
    check_with_deepspeed(cfg)
    use_run_storage(cfg)
    if not cfg.optim.gradient_skip:  # refused here once: every worker would refuse it, and Ray retry it
        raise ValueError("optim.gradient_skip=false is out of range with DeepSpeed workers; allowed: true (DeepSpeed "
                         "always skips a step whose gradient is not finite); train in one process to never skip")
    if cfg.data.order == "sequential" and cfg.scaling.workers > 1:
        raise ValueError(f"data.order='sequential' is out of range with scaling.workers={cfg.scaling.workers}; "
                         "allowed: shuffled (workers split the images), or sequential with one worker")
    data = dataclasses.replace(cfg.data, shards=_absolute(cfg.data.shards))
    init_from = cfg.train.init_from
    if init_from and "://" not in init_from and ":/" not in init_from:  # a local path, as the workers will see it
        init_from = _absolute(init_from)
    train = dataclasses.replace(cfg.train, output=_absolute(cfg.train.output), init_from=init_from)
    cfg = dataclasses.replace(cfg, data=data, train=train)
    if cfg.data.shards and cfg.data.source:
        ensure_shards(cfg.data, cfg.train.seed)
    return cfg


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train: a remote URL is opened by the same
    fsspec filesystem as the data and the exports (train.storage_options included) and handed
    to Ray through pyarrow's fsspec adapter, so checkpoints need no second S3 configuration."""
    if "://" not in url:
        return url, None
    import pyarrow.fs

    fs, path = to_fs(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def train_distributed(cfg: RunConfig, resume: str | None = None, name: str | None = None,
                      verbose: bool = False) -> dict:
    cfg = prepare(cfg)
    storage = ray_storage_path(cfg)
    # Ray Train restores a run's latest checkpoint by itself when the same storage_path/name
    # is trained again: a re-run of the same train.output continues it, stated here
    own = latest_ray_checkpoint(cfg)
    resume = _absolute(resume) if resume else resume  # the workers do not run in this folder
    if resume and own and resume != own:
        raise ValueError(f"--resume {resume}: train.output={cfg.train.output} already holds a run (latest checkpoint "
                         f"{own}), which a re-run continues; resume from another run into a new train.output")
    if own:  # a resume every worker would refuse, refused here once (Ray would retry it in vain)
        fs, path = to_fs(join(own, run_folder.CONFIG_FILE))
        run_folder.check_model_config(json.loads(fs.cat_file(path)), cfg, redact(own))
        print(redact(f"continuing the run in {cfg.train.output} from its latest checkpoint {own}"), flush=True)
    elif resume:  # complete, and of this model: every worker would fail on it, max_failures times
        check_resumable(resume, cfg)
        fs, path = to_fs(join(resume, run_folder.ZERO_LAYOUT_FILE))
        if not fs.exists(path):
            raise ValueError(f"--resume {redact(resume)}: the checkpoint has no {run_folder.ZERO_LAYOUT_FILE}: it was "
                             "not written by `vdvae-dist launch` (a `vdvae-dist train` checkpoint holds plain-torch "
                             "state); start from its weights with --set train.init_from=<that folder> instead")
    with output_lock.locked(cfg.train.output):  # a second run into this output is refused
        return _fit(cfg, resume, name, verbose, storage)


def _fit(cfg: RunConfig, resume: str | None, name: str | None, verbose: bool, storage: str) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import train_worker

    s = cfg.scaling
    storage_path, storage_filesystem = ray_storage(storage)
    if not ray.is_initialized():
        # no runtime_env here: under `ray job submit` the job's own runtime_env applies, and the
        # workers get theirs from worker_runtime_env below
        if not verbose:
            without_preemption_watcher_here()
        init_ray(log_to_driver=True)
    # before any worker starts: on several nodes, a store of rank 0's node would hide the run
    tracking_uri = workers_tracking_uri(cfg)
    resources = {"CPU": s.cpus_per_worker}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        # the tracking URI is resolved on the worker that logs (MLFLOW_TRACKING_URI may exist there
        # only); the driver's (checked above) is the fallback. The run's source is this driver's
        # command: the workers run Ray's default_worker.py
        train_loop_config={"config": to_dict(cfg), "resume": resume, "verbose": verbose,
                           "fallback_tracking_uri": tracking_uri, "source_tags": source_tags()},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=s.placement),
        run_config=RayRunConfig(
            name=name or ray_run_name(cfg),
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    fs, root = to_fs(cfg.train.output)
    failure = join(root, FAILURE_FILE)
    if fs.exists(failure):  # from an earlier attempt of this output
        fs.rm(failure)
    result = trainer.fit()
    if fs.exists(failure):  # a deterministic failure the workers stopped on instead of letting Ray retry it
        failed = json.loads(fs.cat_file(failure))
        raise (EvaluationFailed if failed.get("kind") == "evaluation" else TrainingDiverged)(failed["error"])
    path = join(root, SUMMARY_FILE)
    summary = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and "://" in storage and "://" not in checkpoint:  # pyarrow paths drop the scheme
        checkpoint = storage.split("://", 1)[0] + "://" + checkpoint
    summary["checkpoint"] = checkpoint  # a local path, or the URL on remote storage
    if checkpoint:
        summary["checkpoint_uri"] = checkpoint if "://" in checkpoint else Path(checkpoint).as_uri()
    if summary.get("mlflow_run_id") and checkpoint and tracking_uri:  # "": the workers named their own
        tag_checkpoint(cfg, tracking_uri, summary["mlflow_run_id"], redact(summary["checkpoint_uri"]))
    return redact_all(summary)

