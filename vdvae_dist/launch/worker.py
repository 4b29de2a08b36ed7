"""What every Ray Train worker runs: the training loop (train/loop.py) with the DeepSpeed
update rule, checkpoints reported to Ray Train, and MLflow on rank 0."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..artifacts.run_folder import FAILURE_FILE, complete_file, fsync_dir, fsync_tree, marker_bytes
from ..artifacts.storage import join, to_fs, use_run_storage, write_atomic
from ..config import from_dict
from ..tracking import make_tracker
from ..train.init import initial_model
from ..train.loop import Trainer
from ..train.publish import EvaluationFailed
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
        """This rank's files go up through Ray (which copies them in no set order); its
        completion marker, listing them, follows in a step of its own once they are all there."""
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            marker = marker_bytes(Path(tmp), rank, world, step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_fn=lambda checkpoint, name: upload_then_mark(
                                 ctx.get_storage(), checkpoint, name, complete_file(rank), marker))
        return None  # Ray publishes it; the driver reads the final path from the result

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)


def upload_then_mark(storage, checkpoint, name: str, marker_name: str, marker: bytes):
    """Ray Train's checkpoint_upload_fn: Ray's own copy of this rank's files into the run's
    checkpoint folder `name`, then (local storage: fsynced first) the marker, last."""
    import pyarrow.fs

    persisted = storage.persist_current_checkpoint(checkpoint, name)
    fs, path = storage.storage_filesystem, persisted.path
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    if local:  # every rank fsyncs its own files (and the shared folders) before its marker
        fsync_tree(Path(path))
    with fs.open_output_stream(f"{path}/{marker_name}") as f:
        f.write(marker)
    if local:
        with open(Path(path) / marker_name, "rb") as f:
            os.fsync(f.fileno())
        fsync_dir(path)
    return persisted


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
    except (TrainingDiverged, EvaluationFailed) as e:
        # every rank takes the same skip decisions (and learns of any rank's failed held-out
        # pass), so all stop here together; a Ray retry would resume the same checkpoint and
        # fail again: end normally, and leave the reason for the driver to raise
        say(f"stopping: {e}")
        if rank == 0:
            fs, root = to_fs(cfg.train.output)
            kind = "evaluation" if isinstance(e, EvaluationFailed) else "diverged"
            write_atomic(fs, join(root, FAILURE_FILE), json.dumps({"error": str(e), "kind": kind}).encode())
