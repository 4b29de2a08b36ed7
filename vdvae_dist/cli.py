"""`vdvae-dist` command line: train, launch, evaluate, serve, import, config, params, shards."""
from __future__ import annotations

import argparse
import shlex
import sys


def _config_args(p: argparse.ArgumentParser, default_preset: str | None) -> None:
    p.add_argument("--preset", default=default_preset, help="named preset (see `vdvae-dist params`)")
    p.add_argument("--config", help="TOML/YAML file applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optim.lr=2e-4 (repeatable)")


def _load(args):
    from .config import load

    return load(args.preset, args.config, args.overrides)


def cmd_train(args) -> int:
    from .train.local import train_local

    cfg = _load(args)
    summary = train_local(cfg, resume=not args.no_resume)
    print(f"test bits/dim: {summary['test_bits_per_dim']:.4f} "
          f"({summary['test_nats_per_image']:.2f} nats/image) after {summary['step']} steps, "
          f"{summary['skipped']} skipped")
    print(f"sample grid:   {summary['samples']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    return 0


def cmd_launch(args) -> int:
    from .launch.ray_train import latest_checkpoint, train_distributed

    overrides = list(args.overrides)
    for flag, key in (("data", "data.shards"), ("workers", "scaling.workers"), ("gpus_per_worker", "scaling.gpus_per_worker"),
                      ("cpus_per_worker", "scaling.cpus_per_worker"), ("zero_stage", "engine.zero_stage"),
                      ("output", "train.output")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    from .config import load

    if args.data is not None:
        overrides.append("data.source=")  # stream the given shards; never rebuild them
    import torch

    if args.workers is None and args.gpus_per_worker is None and torch.cuda.is_available():
        overrides += ["scaling.workers=1", "scaling.gpus_per_worker=1"]  # the embedded default on a GPU machine
    cfg = load(args.preset, args.config, overrides)
    resume = args.resume
    if resume == "latest":
        resume = latest_checkpoint(cfg)
        if resume is None:
            raise ValueError(f"--resume latest: no checkpoint under {cfg.train.output}")
    summary = train_distributed(cfg, resume=resume, verbose=args.verbose)
    print(f"test bits/dim: {summary['test_bits_per_dim']:.4f} ({summary['test_nats_per_image']:.2f} nats/image, "
          f"{summary['eval_images']} {summary['eval_split']} images) after {summary['step']} steps, "
          f"{summary['skipped']} skipped, {summary['world']} workers")
    if summary.get("mlflow_run_url"):
        print(f"MLflow run:    {summary['mlflow_run_url']}")
    print(f"sample grid:   {summary['samples']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    return 0


def cmd_evaluate(args) -> int:
    from .artifacts.weights import load_weights
    from .data.stream import eval_loader
    from .train.evaluation import evaluate

    weights = load_weights(args.weights)
    data = args.data or weights.cfg.data.shards
    if not data:
        raise ValueError("--data is required: the run streamed no shards")
    batches = (images for images, _ in eval_loader(data, args.split, args.batch_size, num_workers=0))
    score = evaluate(weights.model, batches, weights.cfg.engine.bf16)
    print(f"{args.split}: {score.bits_per_dim:.4f} bits/dim ({score.nats_per_image:.2f} nats/image) over "
          f"{score.images} images (EMA weights, step {weights.step}, {weights.source})")
    return 0


def cmd_serve(args) -> int:
    import os

    from .config import load
    from .launch.ray_init import init_ray
    from .serve.app import ray_started_here, run, stop_ray

    overrides = list(args.overrides)
    overrides += [f"serve.{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v is not None]
    cfg = load(args.preset, args.config, overrides)  # the serve.* fields; the model's config comes with it
    try:
        init_ray(args.address)  # None: the job's cluster, RAY_ADDRESS, a live `ray start` cluster, or a new local one
    except KeyboardInterrupt:  # Ctrl-C while Ray starts (from then on, run() handles SIGINT and SIGTERM)
        print("interrupted", file=sys.stderr)
        return 130
    local, served = ray_started_here(), False
    try:  # until SIGINT/SIGTERM; on a cluster that outlives us, the app (and a Serve we started) is deleted
        run(args.model, cfg, stop_serve=not local)
        served = True
    finally:
        if not stop_ray(timeout_s=3.0 if local else 10.0):  # a local cluster we started stops with it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if served else 1)  # Ray gone or stuck: its exit hooks would only wait again
    return 0


def cmd_config(args) -> int:
    from .config import dumps

    print(dumps(_load(args)))
    return 0


def cmd_import(args) -> int:
    from .artifacts.official_import import import_checkpoint

    r = import_checkpoint(args.source, args.checkpoint, args.out, hparams=args.hparams, hps=args.hps)
    print(f"imported {r.weights} weights ({r.parameters:,} parameters, config from {r.preset}) -> {r.out}")
    if r.weights != "ema":
        print("note: these are the training weights; the official evaluation and sampling use the EMA ones "
              "(Efficient-VDVAE: ema_model_state_dict; openai/vdvae: *-model-ema.th)")
    return 0


def cmd_params(args) -> int:
    import torch

    from .config import available_presets, load
    from .model import build_model, count_parameters

    for name in available_presets():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            n = count_parameters(build_model(load(name).model))
        print(f"{name:14s} {n:>13,}")
    return 0


def parse_size(text: str) -> int:
    """'256MB' -> 268435456 (binary units; a bare number is bytes)."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t)
    raise ValueError(f"--shard-size={text!r} is not a size; allowed: e.g. 256MB, 1GB, 500KB")


def cmd_shards_build(args) -> int:
    from .data.shardwriter import build

    m = build(args.source, args.out, args.resolution, bits=args.bits, shard_bytes=parse_size(args.shard_size),
              val=args.val, test=args.test, workers=args.workers, seed=args.seed, image_format=args.format,
              binarize=args.binarize, force=args.force, command=shlex.join(["vdvae-dist", *args.argv]))
    print(f"{args.out}: {len(m.shards)} shards, " + ", ".join(f"{k} {v:,}" for k, v in m.splits.items()))
    return 0


def cmd_shards_verify(args) -> int:
    from .data.shardwriter import read_manifest, verify

    problems = verify(args.url)
    for p in problems:
        print(f"{args.url}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.url}: {len(read_manifest(args.url).shards)} shards match the manifest")
    return 1 if problems else 0


def cmd_shards_ls(args) -> int:
    from .data.shardwriter import summary

    print(summary(args.url))
    return 0


def _shards_parser(sub) -> None:
    shards = sub.add_parser("shards", help="build, verify and list WebDataset shards").add_subparsers(
        dest="shards_command", required=True)
    b = shards.add_parser("build", help="write shards + manifest.json to file://, s3:// or gs://")
    from .data.sources import allowed_kinds

    b.add_argument("--source", required=True, help=f"KIND[:PATH], e.g. ffhq:/data/images1024x1024; kinds: "
                   f"{allowed_kinds()}")
    b.add_argument("--out", required=True, help="destination URL (a bare path means file://)")
    b.add_argument("--resolution", type=int, required=True)
    b.add_argument("--bits", type=int, default=8, help="8 or 5 (colour), 1 (binary)")
    b.add_argument("--shard-size", default="256MB", help="target bytes per shard")
    b.add_argument("--val", type=int, default=0, help="held-out validation images (from the end of train)")
    b.add_argument("--test", type=int, default=0, help="test images when the source has no official test split")
    b.add_argument("--workers", type=int, default=1, help="parallel encoder processes")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--format", choices=("png", "jpg"), default="png")
    b.add_argument("--binarize", action="store_true", help="static binarization (p = intensity), e.g. MNIST")
    b.add_argument("--force", action="store_true", help="replace a different dataset at --out")
    b.set_defaults(fn=cmd_shards_build)
    v = shards.add_parser("verify", help="check shard sizes, SHA-256 and sample counts against the manifest")
    v.add_argument("url")
    v.set_defaults(fn=cmd_shards_verify)
    ls = shards.add_parser("ls", help="summarise a shard set")
    ls.add_argument("url")
    ls.set_defaults(fn=cmd_shards_ls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdvae-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on one device (CPU or one GPU)")
    _config_args(p, "mnist-small")
    p.add_argument("--no-resume", action="store_true", help="start over even if train.output has checkpoints")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("launch", help="train with Ray Train + DeepSpeed ZeRO workers (local Ray by default)")
    _config_args(p, "mnist-small")
    p.add_argument("--data", help="shard URL to stream (s3://, gs://, file:// or a path); sets data.shards")
    p.add_argument("--workers", type=int, help="Ray Train workers (scaling.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="scaling.gpus_per_worker (0 trains on CPU)")
    p.add_argument("--cpus-per-worker", type=float, help="scaling.cpus_per_worker")
    p.add_argument("--zero-stage", type=int, help="engine.zero_stage (0, 1, 2 or 3)")
    p.add_argument("--output", help="train.output: run folder or URL (checkpoints, summary, samples)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder/URL to continue from")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's own report lines")
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("evaluate", help="exact evaluation pass with a run's EMA weights")
    p.add_argument("--weights", required=True, help="a run output or checkpoint folder/URL, or its ema_fp32.pt")
    p.add_argument("--data", help="shard URL (default: the run's data.shards)")
    p.add_argument("--split", default="test", help="split to evaluate (test, val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("serve", help="Ray Serve sampling service for a run's EMA weights (HTTP)")
    p.add_argument("--model", required=True, help="run output or checkpoint folder/URL, its ema_fp32.pt, or an "
                                                  "MLflow URI such as runs:/<run id>/model/ema_fp32.pt")
    p.add_argument("--host", help="serve.host (0.0.0.0 accepts other machines)")
    p.add_argument("--port", type=int, help="serve.port")
    p.add_argument("--address", help="Ray cluster address (default: the job's cluster or a new local one)")
    _config_args(p, None)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("config", help="print the resolved config as JSON")
    _config_args(p, None)
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("import", help="official Efficient-VDVAE / VDVAE checkpoint -> our export (ema_fp32.pt)")
    p.add_argument("--from", dest="source", required=True, choices=("efficient-vdvae", "vdvae"))
    p.add_argument("--checkpoint", required=True, help="official checkpoint: path, file://, s3:// or gs://")
    p.add_argument("--hparams", help="official hyperparameters: JSON of their values, or an Efficient-VDVAE .cfg "
                   "(default: the paper preset matching the checkpoint's shapes)")
    p.add_argument("--hps", help="openai/vdvae's named hparam set: cifar10 | imagenet32 | imagenet64 | ffhq256 | ffhq1024")
    p.add_argument("--out", required=True, help="folder or .pt URL to write ema_fp32.pt to (path, s3://, gs://)")
    p.set_defaults(fn=cmd_import)
    p = sub.add_parser("params", help="parameter count of every preset")
    p.set_defaults(fn=cmd_params)
    _shards_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in shard manifests
    try:
        return args.fn(args)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"vdvae-dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
