"""The training loop, the same for one process (CPU or one GPU) and for every Ray Train
worker: restore, stream batches, step through the update rule, log, checkpoint through
the store; publishing (data record, sample grids, the end of the run) is train/publish.py."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..artifacts import run_folder
from ..artifacts.run_folder import CheckpointStore
from ..artifacts.storage import redact, redact_all
from ..config import RunConfig, to_dict
from ..core.placement import check_placement
from ..data.pipeline import open_training_data
from ..model import bits_per_dim
from ..tracking import Tracker
from .init import init_source_tags
from .objective import group_sizes
from .progress import Progress
from .publish import ema_model, log_held_out, log_samples, publish, record_data
from .rule import UpdateRule
from .step import train_step


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _append_row(metrics_file: Path | None, row: dict) -> None:
    if metrics_file is not None:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")


@dataclass
class Trainer:
    cfg: RunConfig
    rule: UpdateRule
    store: CheckpointStore
    open_tracker: Callable[[str | None], Tracker]  # called with the resumed MLflow run id, or None
    rank: int = 0
    world: int = 1
    log: Callable[..., None] = print
    sample_during_training: bool = False  # tracking.image_every grids (collective: all ranks agree)
    summary_extra: dict = field(default_factory=dict)

    def run(self) -> dict:
        cfg, rule, rank, world = self.cfg, self.rule, self.rank, self.world
        say = self.log if rank == 0 else (lambda *_: None)
        check_placement(rule.module, rule.device, rule.memory_format)
        data_state, run_id, restored_at, last_checkpoint = None, None, -1, None
        with self.store.restore() as folder:
            if folder is not None:
                last_checkpoint = str(folder)  # the local store's folder; Ray's driver reports its own
                # before loading tensors: a checkpoint of another model would not fit
                saved_config = run_folder.read_config(folder)
                run_folder.check_model_config(saved_config, cfg, str(folder))
                changed = run_folder.changed_training(saved_config, cfg)
                if changed:
                    say(f"warning: resuming with training settings other than the checkpoint's: {', '.join(changed)}")
                client = rule.load(folder)
                run_id = client.get("mlflow_run_id")
                if client.get("world") == world:  # positions are per rank: only for the same world
                    data_state = run_folder.read_data_state(folder, rank)
                restored_at = rule.step
                say(f"resumed at step {rule.step}")
        data = open_training_data(cfg.data, cfg.optim.batch_size // world, cfg.train.seed, rank=rank, world=world,
                                  state=data_state, pin_memory=rule.device.type == "cuda", log=say)
        tracker = self.open_tracker(run_id)
        say(f"precision: {rule.precision}")
        tracker.set_tags({"precision": str(rule.precision), "compile": cfg.engine.compile,
                          **init_source_tags(cfg.train.init_from)})
        if cfg.train.init_from and restored_at < 0:
            say(f"started from the weights of train.init_from={redact(cfg.train.init_from)}")
        if tracker.run_id is not None:
            say(f"MLflow run: {redact(tracker.url)}")
            if cfg.data.shards and run_id is None:  # which data this run saw, once per run
                record_data(tracker, cfg, data.eval_split)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in rule.module.parameters())  # ZeRO-3: partitions
        say(f"model {cfg.model.kind}/{cfg.model.design}: {n_params:,} parameters on {rule.device}, "
            f"{world} worker(s); {data.description}")
        try:
            last_checkpoint = self._loop(data, tracker, restored_at) or last_checkpoint
            return publish(cfg, rule, data, tracker, last_checkpoint, rank=rank, world=world,
                           summary_extra=self.summary_extra, log=self.log)
        except BaseException:
            tracker.finish("FAILED")  # the MLflow run shows how it ended
            raise

    # -- training -----------------------------------------------------------------------
    def _loop(self, data, tracker: Tracker, restored_at: int) -> str | None:
        cfg, rule, rank, world = self.cfg, self.rule, self.rank, self.world
        total, o = cfg.optim.total_steps, cfg.train
        sizes = group_sizes(rule.module).to(rule.device)  # once: balancing reads it every micro-batch
        metrics_file = Path(o.output) / run_folder.METRICS_FILE if rank == 0 and "://" not in o.output else None
        progress = Progress(total, rule.step, enabled=rank == 0)
        last, saved_at = None, restored_at  # a restored step needs no second checkpoint
        t_last, n_last, wait = time.perf_counter(), 0, 0.0
        first_step = True  # of this process: where compiling happens
        while rule.step < total:
            t0 = time.perf_counter()
            batch = next(data)
            wait += time.perf_counter() - t0
            t_step = time.perf_counter()
            terms, outcome = train_step(rule, batch, cfg.loss, sizes, o.seed, rank)
            if first_step and rule.compiled is not None:
                self._report_compile(tracker, time.perf_counter() - t_step)
            first_step = False
            n_last += len(batch) * world
            log_now = rule.step % o.log_every == 0 or rule.step == total
            save_now = bool(o.checkpoint_every) and rule.step % o.checkpoint_every == 0
            row = None
            if log_now or save_now:  # every rank reaches this the same number of times (collectives)
                now = time.perf_counter()
                row = self._row(terms, outcome, n_last / (now - t_last), wait / (now - t_last), data.bad_samples)
                t_last, n_last, wait = now, 0, 0.0
                tracker.log_metrics(row, step=rule.step)
                _append_row(metrics_file, row)
                if save_now:
                    last, saved_at = self._save(data, tracker, row), rule.step
                else:
                    self.store.report(row)
            progress.update(rule.step, row)
            if o.eval_every and data.n_eval and rule.step % o.eval_every == 0 and rule.step < total:  # end: its own
                held_out = log_held_out(tracker, cfg, rule, data, rank, world)  # collective
                _append_row(metrics_file, {"step": rule.step, **held_out})
                if rank == 0:
                    self.log(f"step {rule.step}: held-out {held_out['eval/bits_per_dim']:.4f} bits/dim (EMA weights)")
            if (self.sample_during_training and cfg.tracking.image_every and rule.step % cfg.tracking.image_every == 0
                    and rule.step < total):  # the last step's grid: publish.py's, from the same weights
                self._log_samples(tracker, rule.step)
        progress.close()
        if saved_at != rule.step:
            last = self._save(data, tracker, {"step": rule.step})
        return last

    def _report_compile(self, tracker: Tracker, first_step_s: float) -> None:
        """After the first step of this process: whether compiling worked, and what it cost."""
        compiled = self.rule.compiled
        if self.rank == 0:
            self.log(f"{compiled.describe()}; first step {first_step_s:.1f} s, compiling included")
        tracker.log_metrics({"compile/first_step_s": first_step_s}, step=self.rule.step)
        if compiled.failure is not None:
            tracker.set_tags({"compile": f"off (failed: {compiled.failure})"})

    def _row(self, terms, outcome, images_per_s: float, wait_fraction: float, bad_samples: int) -> dict:
        """Metrics of this step, averaged over all ranks' micro-batches."""
        stats = torch.cat([torch.stack([terms.loss.detach(), terms.nelbo, terms.recon, terms.kl]).float(),
                           terms.kl_groups.float()])
        if _distributed():  # on the tensors' device: NCCL reduces CUDA tensors only
            dist.all_reduce(stats)
            stats /= self.world
        stats = stats.tolist()
        return {"step": self.rule.step, "loss": stats[0], "nelbo_nats_per_dim": stats[1],
                "bits_per_dim": bits_per_dim(stats[1], 1), "recon": stats[2], "kl": stats[3],
                **{f"kl_group_{g:03d}": v for g, v in enumerate(stats[4:])},
                # this step's update: pre-clip norm, clipped, skipped (0/1); "skipped" counts the run's skips
                "grad_norm": outcome.grad_norm, "clipped": int(outcome.clipped), "skipped_now": int(outcome.skipped),
                **({} if outcome.grad_norm_after_clip is None else {"grad_norm_after_clip": outcome.grad_norm_after_clip}),
                "skipped": self.rule.skipped, "lr": outcome.lr, "beta": terms.beta,
                "images_per_s": images_per_s, "data_wait_fraction": wait_fraction, "bad_samples": bad_samples}

    def _save(self, data, tracker: Tracker, metrics: dict) -> str | None:
        """Collective: every rank writes its part of the checkpoint into one folder."""
        # stored: URLs without credentials (the run reads its own from its config, not from here)
        client = {"config": redact_all(to_dict(self.cfg)), "world": self.world, "mlflow_run_id": tracker.run_id}

        def write(folder: Path) -> None:
            self.rule.save(folder, client)
            run_folder.write_rank_files(folder, self.rank, self.world, self.rule.step, client["config"],
                                        data.state_dict())

        return self.store.save(self.rule.step, write, metrics)

    def _log_samples(self, tracker: Tracker, step: int) -> None:
        weights = self.rule.ema_weights()  # collective
        if self.rank == 0:
            log_samples(tracker, self.cfg, ema_model(self.cfg, weights, self.rule.device), step)
