"""Build and run the Ray Train TorchTrainer for a RunConfig."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import RunConfig, to_dict


def worker_env(cfg: RunConfig) -> dict[str, str]:
    threads = str(max(1, int(cfg.scaling.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if cfg.scaling.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    return env


def train_distributed(cfg: RunConfig, resume: str | None = None, run_name: str | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import train_worker

    s = cfg.scaling
    storage = cfg.train.output if "://" in cfg.train.output else str(Path(cfg.train.output).resolve() / "ray")
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=True)
    resources = {"CPU": s.cpus_per_worker}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "resume": resume},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=s.placement),
        run_config=RayRunConfig(
            name=run_name or Path(cfg.train.output).name or "vdvae",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    result = trainer.fit()
    summary_path = Path(cfg.train.output) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return summary
