"""Build and run the Ray Train TorchTrainer for a RunConfig."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..artifacts.storage import join, redact, redact_all, to_fs
from ..config import RunConfig, to_dict
from ..tracking.mlflow_tracker import default_uri, resolve_uri
from ..tracking.source import source_tags
from ..train.rule import TrainingDiverged
from .ray_init import init_ray


def worker_env(cfg: RunConfig) -> dict[str, str]:
    threads = str(max(1, int(cfg.scaling.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if cfg.scaling.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    return env


def storage_path(cfg: RunConfig) -> str:
    return cfg.train.output.rstrip("/") + "/ray" if "://" in cfg.train.output else str(Path(cfg.train.output).resolve() / "ray")


def run_name(cfg: RunConfig) -> str:
    return Path(cfg.train.output.rstrip("/")).name or "vdvae"


def is_complete(fs, folder: str) -> bool:
    """Every rank of the world that wrote the checkpoint left its completion marker (each
    rank writes it after all its other files; Ray uploads each rank's files separately)."""
    from ..train.loop import complete_file

    marker = join(folder, complete_file(0))
    if not fs.exists(marker):
        return False
    world = int(json.loads(fs.cat_file(marker))["world"])
    return all(fs.exists(join(folder, complete_file(r))) for r in range(1, world))


def latest_checkpoint(cfg: RunConfig) -> str | None:
    """Newest complete checkpoint folder of this run (falling back past incomplete ones), or None."""
    base = join(storage_path(cfg), run_name(cfg))
    fs, root = to_fs(base)
    if not fs.exists(root):
        return None
    found = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_"))
    for folder in reversed(found):
        if is_complete(fs, folder):
            return folder if "://" not in base else base.split("://")[0] + "://" + folder
    return None


def _absolute(path: str) -> str:
    return path if (not path or "://" in path) else str(Path(path).resolve())


def prepare(cfg: RunConfig) -> RunConfig:
    """Driver-side set-up: local paths made absolute (workers do not run in the driver's
    working directory) and the shards built once, before any worker reads them."""
    from ..data.pipeline import ensure_shards

    data = dataclasses.replace(cfg.data, shards=_absolute(cfg.data.shards))
    train = dataclasses.replace(cfg.train, output=_absolute(cfg.train.output))
    cfg = dataclasses.replace(cfg, data=data, train=train)
    if cfg.data.shards and cfg.data.source:
        ensure_shards(cfg.data, cfg.train.seed)
    return cfg


def train_distributed(cfg: RunConfig, resume: str | None = None, name: str | None = None,
                      verbose: bool = False) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import FAILURE_FILE, train_worker

    cfg = prepare(cfg)
    s = cfg.scaling
    storage = storage_path(cfg)
    # Ray Train restores a run's latest checkpoint by itself when the same storage_path/name
    # is trained again: a re-run of the same train.output continues it, stated here
    own = latest_checkpoint(cfg)
    if resume and own and resume != own:
        raise ValueError(f"--resume {resume}: train.output={cfg.train.output} already holds a run (latest checkpoint "
                         f"{own}), which a re-run continues; resume from another run into a new train.output")
    if own:  # a resume every worker would refuse, refused here once (Ray would retry it in vain)
        from ..train.loop import CONFIG_FILE, check_model_config

        fs, path = to_fs(join(own, CONFIG_FILE))
        check_model_config(json.loads(fs.cat_file(path)), cfg, redact(own))
        print(redact(f"continuing the run in {cfg.train.output} from its latest checkpoint {own}"), flush=True)
    if not ray.is_initialized():
        # no runtime_env here: under `ray job submit` the job's own runtime_env applies, and the
        # workers get theirs from worker_runtime_env below
        init_ray(log_to_driver=True)
    resources = {"CPU": s.cpus_per_worker}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        # the tracking URI is resolved on the worker that logs (MLFLOW_TRACKING_URI may exist there
        # only); the driver's embedded store is the fallback. The run's source is this driver's
        # command: the workers run Ray's default_worker.py
        train_loop_config={"config": to_dict(cfg), "resume": resume, "verbose": verbose,
                           "fallback_tracking_uri": default_uri()[0], "source_tags": source_tags()},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=s.placement),
        run_config=RayRunConfig(
            name=name or run_name(cfg),
            storage_path=storage,
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
        raise TrainingDiverged(json.loads(fs.cat_file(failure))["error"])
    path = join(root, "summary.json")
    summary = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and "://" in storage and "://" not in checkpoint:  # pyarrow paths drop the scheme
        checkpoint = storage.split("://", 1)[0] + "://" + checkpoint
    summary["checkpoint"] = checkpoint  # a local path, or the URL on remote storage
    if checkpoint:
        summary["checkpoint_uri"] = checkpoint if "://" in checkpoint else Path(checkpoint).as_uri()
    if summary.get("mlflow_run_id") and checkpoint:
        tag_checkpoint(cfg, summary["mlflow_run_id"], redact(summary["checkpoint_uri"]))
    return redact_all(summary)


def tag_checkpoint(cfg: RunConfig, run_id: str, uri: str) -> None:
    """Best effort: the driver may not reach the tracking server the workers logged to."""
    import mlflow

    try:
        mlflow.MlflowClient(resolve_uri(cfg, default_uri()[0])).set_tag(run_id, "checkpoint", uri)
    except Exception as e:  # the run and its checkpoint exist either way
        print(f"warning: could not tag MLflow run {run_id} with its checkpoint: {redact(str(e))}", flush=True)
