"""The training loop, the same for one process (CPU or one GPU) and for every Ray Train
worker: restore, stream batches, step through the update rule, log, checkpoint through
the store, then evaluate the EMA weights and publish the run's artifacts."""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..artifacts.images import grid, save_grid
from ..artifacts.storage import join, redact, redact_all, to_fs, write_atomic
from ..artifacts.weights import EXPORT_NAME, export_dict
from ..config import RunConfig, to_dict
from ..data.pipeline import open_training_data
from ..model import bits_per_dim, build_model
from ..tracking import Tracker
from .checkpoints import CheckpointStore
from .evaluation import evaluate, log_evaluation_figures
from .objective import group_sizes
from .progress import Progress
from .rule import UpdateRule
from .step import check_placement, train_step


CONFIG_FILE = "config.json"


def data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


def complete_file(rank: int) -> str:
    """Written by each rank after all its other files: a checkpoint folder holding one per
    rank of the world that wrote it is complete (launch/ray_train.latest_checkpoint)."""
    return f"complete-rank{rank:05d}.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_model_config(saved: dict, cfg: RunConfig, where: str) -> None:
    """Refuse to resume a checkpoint of another model (the tensors would not fit)."""
    saved, now = saved["model"], to_dict(cfg)["model"]
    if saved != now:
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        raise ValueError(f"checkpoint {where} was trained with a different model config (model."
                         f"{', model.'.join(changed)}); use a new train.output, start over, or resume with the "
                         "config it was trained with")


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
                path = Path(folder) / CONFIG_FILE
                if not path.is_file():
                    raise ValueError(f"checkpoint {folder} has no {CONFIG_FILE} (written by an older vdvae-dist); "
                                     "start over in a new train.output")
                check_model_config(json.loads(path.read_text()), cfg, str(folder))  # before loading tensors
                client = rule.load(folder)
                run_id = client.get("mlflow_run_id")
                path = Path(folder) / data_file(rank)
                if path.exists() and client.get("world") == world:
                    data_state = json.loads(path.read_text())
                restored_at = rule.step
                say(f"resumed at step {rule.step}")
        data = open_training_data(cfg.data, cfg.optim.batch_size // world, cfg.train.seed, rank=rank, world=world,
                                  state=data_state, pin_memory=rule.device.type == "cuda", log=say)
        tracker = self.open_tracker(run_id)
        say(f"precision: {rule.precision}")
        tracker.set_tags({"precision": str(rule.precision), "compile": cfg.engine.compile})
        if tracker.run_id is not None:
            say(f"MLflow run: {redact(tracker.url)}")
            if cfg.data.shards and run_id is None:  # which data this run saw, once per run
                from ..data.shardwriter import manifest_dict, read_manifest

                manifest = read_manifest(cfg.data.shards)
                tracker.log_dict(manifest_dict(manifest), "data/manifest.json")
                tracker.log_dataset(manifest, cfg.data.shards, "train", "training")
                tracker.log_dataset(manifest, cfg.data.shards, data.eval_split, "evaluation")
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in rule.module.parameters())  # ZeRO-3: partitions
        say(f"model {cfg.model.kind}/{cfg.model.design}: {n_params:,} parameters on {rule.device}, "
            f"{world} worker(s); {data.description}")
        try:
            last_checkpoint = self._loop(data, tracker, restored_at) or last_checkpoint
            return self._publish(data, tracker, last_checkpoint)
        except BaseException:
            tracker.finish("FAILED")  # the MLflow run shows how it ended
            raise

    # -- training -----------------------------------------------------------------------
    def _loop(self, data, tracker: Tracker, restored_at: int) -> str | None:
        cfg, rule, rank, world = self.cfg, self.rule, self.rank, self.world
        total, o = cfg.optim.total_steps, cfg.train
        sizes = group_sizes(rule.module)
        metrics_file = Path(o.output) / "metrics.jsonl" if rank == 0 and "://" not in o.output else None
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
                if metrics_file is not None:
                    metrics_file.parent.mkdir(parents=True, exist_ok=True)
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if save_now:
                    last, saved_at = self._save(data, tracker, row), rule.step
                else:
                    self.store.report(row)
            progress.update(rule.step, row)
            if self.sample_during_training and cfg.tracking.image_every and rule.step % cfg.tracking.image_every == 0:
                self._log_samples(tracker, f"samples/step-{rule.step:08d}.png")
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
                "grad_norm": outcome.grad_norm, "skipped": self.rule.skipped, "lr": outcome.lr, "beta": terms.beta,
                "images_per_s": images_per_s, "data_wait_fraction": wait_fraction, "bad_samples": bad_samples}

    def _save(self, data, tracker: Tracker, metrics: dict) -> str | None:
        """Collective: every rank writes its part of the checkpoint into one folder."""
        # stored: URLs without credentials (the run reads its own from its config, not from here)
        client = {"config": redact_all(to_dict(self.cfg)), "world": self.world, "mlflow_run_id": tracker.run_id}

        def write(folder: Path) -> None:
            self.rule.save(folder, client)
            if self.rank == 0:
                (folder / CONFIG_FILE).write_text(json.dumps(client["config"], indent=1))
            (folder / complete_file(self.rank)).write_text(json.dumps({"world": self.world, "step": self.rule.step}))
            (folder / data_file(self.rank)).write_text(json.dumps(data.state_dict()))

        return self.store.save(self.rule.step, write, metrics)

    def _ema_model(self, weights: dict):
        """The EMA weights in a plain model on this rank's device."""
        model = build_model(self.cfg.model)
        model.load_state_dict(weights)
        return model.to(self.rule.device).eval()

    def _log_samples(self, tracker: Tracker, name: str) -> None:
        weights = self.rule.ema_weights()  # collective
        if self.rank == 0:
            model = self._ema_model(weights)
            c = self.cfg.train
            tracker.log_image(grid(model.sample(c.grid_samples, c.grid_temperature, seed=c.seed).cpu()), name)

    # -- the end of a run -------------------------------------------------------------------
    def _publish(self, data, tracker: Tracker, last_checkpoint: str | None) -> dict:
        """Exact pass with the EMA weights over every rank's share; rank 0 writes the weights,
        the sample grid and summary.json to train.output and logs them to MLflow."""
        cfg, rule = self.cfg, self.rule
        weights = self.rule.ema_weights()  # collective
        model = self._ema_model(weights)  # every rank evaluates its share of the held-out images
        score = evaluate(model, data.eval_pass(max(1, cfg.optim.batch_size // self.world)), rule.bf16,
                         seed=cfg.train.seed)
        summary: dict = {}
        if self.rank == 0:
            out = cfg.train.output.rstrip("/")
            fs, root = to_fs(out)
            c = cfg.train
            samples = model.sample(c.grid_samples, c.grid_temperature, seed=c.seed).cpu()
            scores = {"test_bits_per_dim": score.bits_per_dim, "test_nats_per_image": score.nats_per_image,
                      "eval_split": data.eval_split, "eval_images": score.images}
            summary = {"step": rule.step, "skipped": rule.skipped, **scores, "samples": join(out, "samples.png"),
                       "weights": join(out, EXPORT_NAME), "checkpoint": last_checkpoint, "world": self.world,
                       "mlflow_run_url": tracker.url, "mlflow_run_id": tracker.run_id, **self.summary_extra}
            if "://" not in out:
                summary["metrics"] = join(out, "metrics.jsonl")
            with tempfile.TemporaryDirectory() as tmp:  # written locally, then published to the output URL
                torch.save(export_dict(redact_all(to_dict(cfg)), {k: v.cpu() for k, v in weights.items()}, rule.step, scores),
                           Path(tmp) / EXPORT_NAME)
                save_grid(samples, Path(tmp) / "samples.png")
                for name in (EXPORT_NAME, "samples.png"):
                    write_atomic(fs, join(root, name), (Path(tmp) / name).read_bytes())
                if tracker.run_id is not None:
                    tracker.log_metrics({"test_bits_per_dim": score.bits_per_dim,
                                         "test_nats_per_image": score.nats_per_image}, step=rule.step)
                    tracker.log_image(grid(samples), "samples/final.png")
                    images = next(iter(data.eval_pass(4)))[:4].to(rule.device)
                    try:  # figures are extras: a plotting failure must not stop the publish
                        util = log_evaluation_figures(tracker, model, score, images, seed=c.seed)
                        tracker.log_metrics({"active_fraction": util.active_fraction}, step=rule.step)
                    except Exception as e:
                        self.log(f"warning: evaluation figures skipped ({type(e).__name__}: {e})")
                    tracker.log_artifact(str(Path(tmp) / EXPORT_NAME), "model")  # plain fp32 EMA weights + config
                    # the same export as the run's logged model (and registered model): its models:/ URIs
                    logged = tracker.log_model(str(Path(tmp) / EXPORT_NAME), tuple(model.data_shape), rule.step)
                    summary.update({f"mlflow_{kind}_uri": uri for kind, uri in logged.items()})
                summary = redact_all(summary)
                Path(tmp, "summary.json").write_text(json.dumps(summary, indent=2))
                write_atomic(fs, join(root, "summary.json"), Path(tmp, "summary.json").read_bytes())
                if tracker.run_id is not None:
                    tracker.log_artifact(str(Path(tmp) / "summary.json"))
            tracker.finish()
        if _distributed():
            dist.barrier()
        return summary
