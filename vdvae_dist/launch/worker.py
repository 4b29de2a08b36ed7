"""What every Ray Train worker runs: the training loop (train/loop.py) with the DeepSpeed
update rule, checkpoints reported to Ray Train, and MLflow on rank 0."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..artifacts.run_folder import FAILURE_FILE
from ..artifacts.storage import join, to_fs, use_run_storage, write_atomic
from ..config import from_dict
from ..tracking import make_tracker
from ..train.init import initial_model
from ..train.loop import Trainer
from ..train.rule import TrainingDiverged
from ..train.progress import say
from .quiet import quiet_worker_console


class RayCheckpoints:
    """Checkpoints kept by Ray Train under storage_path/name (it keeps the newest
    train.keep_checkpoints); restores Ray's own latest (after a worker failure, or a re-run
    of the same run) or else the folder given by --resume."""

    def __init__(self, resume: str | None):
        self.resume = resume

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.resume:
            checkpoint = ray.train.Checkpoint(self.resume)
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> str | None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        return None  # Ray publishes it; the driver reads the final path from the result

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)


def train_worker(loop_config: dict) -> None:
    import ray
    import ray.train

    from ..engine.deepspeed_rule import DeepSpeedRule

    if not loop_config.get("verbose"):
        quiet_worker_console()
    cfg = from_dict(loop_config["config"])
    use_run_storage(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    rule = DeepSpeedRule(initial_model(cfg), cfg, world)  # the same initial weights on every rank
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    tags = {"data": cfg.data.shards or cfg.data.source, "zero_stage": str(cfg.engine.zero_stage)}
    fallback, source = loop_config.get("fallback_tracking_uri"), loop_config.get("source_tags")
    trainer = Trainer(cfg, rule, RayCheckpoints(loop_config.get("resume")),
                      lambda run_id: make_tracker(cfg, rank, run_id, world, extra_tags=tags, fallback_uri=fallback,
                                                  source=source),
                      rank=rank, world=world, log=say, sample_during_training=True,
                      summary_extra={"nodes": sorted(set(nodes))})
    try:
        trainer.run()
    except TrainingDiverged as e:
        # every rank takes the same skip decisions, so all stop here together; a Ray retry
        # would resume the same checkpoint and diverge again: end normally, and leave the
        # reason for the driver to raise
        say(f"stopping: {e}")
        if rank == 0:
            fs, root = to_fs(cfg.train.output)
            write_atomic(fs, join(root, FAILURE_FILE), json.dumps({"error": str(e)}).encode())
