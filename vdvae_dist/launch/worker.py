"""The body every Ray Train worker runs: rebuild the config, wire model, DeepSpeed
engine, data stream and checkpoints together, train, then evaluate the EMA weights."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import from_dict, to_dict
from ..data.pipeline import open_training_data
from ..artifacts.storage import join, to_fs, write_atomic
from ..model import build_model
from ..model import bits_per_dim
from ..tracking import make_tracker
from ..artifacts.images import grid, save_grid
from ..train.objective import group_sizes
from ..train.step import eval_nelbo
from ..artifacts.weights import EXPORT_NAME, export_dict


def _data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


def train_worker(loop_config: dict) -> None:
    import ray.train

    from ..engine.deepspeed_rule import DeepSpeedRule, train_step

    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    rule = DeepSpeedRule(model, cfg, world)
    sizes = group_sizes(model)  # latent noise: seeded per micro-batch inside train_step

    data_state, run_id = None, None
    checkpoint = ray.train.get_checkpoint()
    resume_dir = loop_config.get("resume")
    if checkpoint is not None or resume_dir:
        source = checkpoint if checkpoint is not None else ray.train.Checkpoint(resume_dir)
        with source.as_directory() as folder:
            client = rule.load(folder)
            if client["config"]["model"] != to_dict(cfg)["model"]:
                raise ValueError(f"checkpoint {source.path} holds a different model config; start a new run "
                                 "or resume with the config it was trained with")
            run_id = client.get("mlflow_run_id")
            path = Path(folder) / _data_file(rank)
            if path.exists() and client.get("world") == world:
                data_state = json.loads(path.read_text())

    data = open_training_data(cfg.data, cfg.optim.batch_size // world, cfg.train.seed, rank=rank, world=world,
                              state=data_state, pin_memory=torch.cuda.is_available(),
                              log=(print if rank == 0 else (lambda *_: None)))

    tracker = make_tracker(cfg, rank, run_id, world, extra_tags={"data": cfg.data.shards or cfg.data.source,
                                                                  "zero_stage": str(cfg.engine.zero_stage)})
    if rank == 0:
        print(f"MLflow run: {tracker.url}", flush=True)
        if cfg.data.shards and run_id is None:  # which data this run saw, once per run
            from ..data.shardwriter import manifest_dict, read_manifest

            tracker.log_dict(manifest_dict(read_manifest(cfg.data.shards)), "data/manifest.json")

    metrics_file = Path(cfg.train.output) / "metrics.jsonl" if rank == 0 and "://" not in cfg.train.output else None

    def report(metrics: dict, save: bool) -> None:
        tracker.log_metrics(metrics, step=rule.step)
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            rule.save(tmp, {"config": to_dict(cfg), "world": world, "mlflow_run_id": tracker.run_id})
            Path(tmp, _data_file(rank)).write_text(json.dumps(data.state_dict()))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    t_last, n_last, wait = time.perf_counter(), 0, 0.0
    while rule.step < cfg.optim.total_steps:
        t0 = time.perf_counter()
        batch = next(data)
        wait += time.perf_counter() - t0
        terms, outcome = train_step(rule, batch, cfg.loss, sizes, cfg.train.seed, rank)
        n_last += len(batch) * world
        log_now = rule.step % cfg.train.log_every == 0 or rule.step == cfg.optim.total_steps
        save_now = bool(cfg.train.checkpoint_every) and rule.step % cfg.train.checkpoint_every == 0
        if log_now or save_now:  # every rank reports the same number of times
            now = time.perf_counter()
            # means over all ranks' micro-batches: [loss, nelbo, recon, kl, kl per group...]
            stats = torch.cat([torch.stack([terms.loss.detach(), terms.nelbo, terms.recon, terms.kl]).float(),
                               terms.kl_groups.float()])
            dist.all_reduce(stats)
            stats = (stats / world).tolist()
            metrics = {"step": rule.step, "loss": stats[0], "nelbo_nats_per_dim": stats[1],
                       "bits_per_dim": bits_per_dim(stats[1], 1), "recon": stats[2], "kl": stats[3],
                       **{f"kl_group_{g:03d}": v for g, v in enumerate(stats[4:])},
                       "grad_norm": outcome.grad_norm, "skipped": rule.skipped,
                       "lr": outcome.lr, "images_per_s": n_last / (now - t_last),
                       "data_wait_fraction": wait / (now - t_last)}
            t_last, n_last, wait = now, 0, 0.0
            report(metrics, save_now)
        if cfg.tracking.image_every and rule.step % cfg.tracking.image_every == 0:
            log_sample_grid(cfg, rule, tracker, rank, f"samples/step-{rule.step:08d}.png")
    if not (cfg.train.checkpoint_every and rule.step % cfg.train.checkpoint_every == 0):
        report({"step": rule.step}, True)
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    evaluate_and_publish(cfg, rule, data, rank, world, tracker, sorted(set(nodes)))


def log_sample_grid(cfg, rule, tracker, rank: int, name: str) -> None:
    """Collective (the EMA is gathered from every rank); rank 0 samples and logs."""
    weights = rule.ema.full_state_dict()
    if rank == 0:
        model = build_model(cfg.model)
        model.load_state_dict(weights)
        tracker.log_image(grid(model.sample(cfg.train.grid_samples, cfg.train.grid_temperature, seed=cfg.train.seed)), name)


def reconstructions_by_depth(model, data, seed: int, n: int = 4):
    """One row per held-out image: the image, then reconstructions keeping the posterior
    latents of the first 0, 1/4, 1/2, 3/4 and all groups (the rest from the prior)."""
    images = next(iter(data.eval_pass(n)))[:n]
    groups = model.num_groups
    depths = sorted({0, groups // 4, groups // 2, 3 * groups // 4, groups})
    columns = [images] + [model.reconstruct(images, d, seed=seed) for d in depths]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # image-major: each row is one image
    return grid(rows, cols=len(columns))


def evaluate_and_publish(cfg, rule, data, rank: int, world: int, tracker, nodes: list[str]) -> None:
    """Exact pass with the EMA weights over this rank's shards; sums over ranks; rank 0
    writes the summary, the sample grid and the plain fp32 EMA weights."""
    ema_weights = rule.ema.full_state_dict()
    ema_model = build_model(cfg.model)
    ema_model.load_state_dict(ema_weights)
    total, count, dims = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    for batch in data.eval_pass(max(1, cfg.optim.batch_size // world)):
        nelbo, dims = eval_nelbo(ema_model, batch, cfg.engine.bf16)
        total += nelbo.double().sum()
        count += len(batch)
    stats = torch.stack([total, count])
    dist.all_reduce(stats)
    if rank == 0:
        out = cfg.train.output.rstrip("/")
        fs, root = to_fs(out)
        samples = ema_model.sample(cfg.train.grid_samples, cfg.train.grid_temperature, seed=cfg.train.seed)
        with tempfile.TemporaryDirectory() as tmp:  # written locally, then published to the output URL
            nats = float(stats[0] / stats[1])
            c, h, w = ema_model.data_shape
            scores = {"test_bits_per_dim": bits_per_dim(nats, c * h * w), "test_nats_per_image": nats,
                      "eval_split": data.eval_split, "eval_images": int(stats[1])}
            torch.save(export_dict(to_dict(cfg), ema_weights, rule.step, scores), Path(tmp) / EXPORT_NAME)
            save_grid(samples, Path(tmp) / "samples.png")
            for name in (EXPORT_NAME, "samples.png"):
                write_atomic(fs, join(root, name), (Path(tmp) / name).read_bytes())
            summary = {"step": rule.step, "skipped": rule.skipped, **scores, "samples": join(out, "samples.png"),
                       "weights": join(out, EXPORT_NAME), "world": world, "nodes": nodes,
                       "mlflow_run_url": tracker.url, "mlflow_run_id": tracker.run_id}
            Path(tmp, "summary.json").write_text(json.dumps(summary, indent=2))
            write_atomic(fs, join(root, "summary.json"), Path(tmp, "summary.json").read_bytes())
            tracker.log_metrics({"test_bits_per_dim": summary["test_bits_per_dim"],
                                 "test_nats_per_image": nats}, step=rule.step)
            tracker.log_image(grid(samples), "samples/final.png")
            tracker.log_image(reconstructions_by_depth(ema_model, data, seed=cfg.train.seed),
                              "reconstructions/by_depth.png")
            tracker.log_artifact(str(Path(tmp) / EXPORT_NAME), "model")  # plain fp32 EMA weights + config
            tracker.log_artifact(str(Path(tmp) / "summary.json"))
        tracker.finish()
    dist.barrier()
