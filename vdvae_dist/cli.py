"""`vdvae-dist` command line: train, launch, evaluate, serve, import, config, plan, params, shards."""
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

    return load(args.preset, args.config, args.overrides + _register(args))


def _with_init_model(cfg, args, overrides: list[str]):
    """train.init_from: the model config comes from those weights, unless set explicitly."""
    from .config.load import read_file
    from .train.init import model_of_weights

    explicit = set(read_file(args.config).get("model", {})) if args.config else set()
    explicit |= {o.split("=", 1)[0].split(".")[1] for o in overrides if o.startswith("model.")}
    return model_of_weights(cfg, explicit)


def _register(args) -> list[str]:
    """--register NAME as its config field."""
    return [f"tracking.register_model={args.register}"] if getattr(args, "register", None) else []


def cmd_train(args) -> int:
    from .train.local import train_local

    cfg = _with_init_model(_load(args), args, args.overrides)
    _print_summary(train_local(cfg, resume=not args.no_resume, track=True))
    return 0


def _print_summary(summary: dict) -> None:
    """What a finished training run (either command) says."""
    workers = f", {summary['world']} workers" if summary.get("world", 1) > 1 else ""
    steps = f"after {summary['step']} steps, {summary['skipped']} skipped{workers}"
    if summary.get("test_bits_per_dim") is None:  # data.val_fraction = 0
        print(f"trained {steps} (no held-out images: data.val_fraction = 0)")
    else:
        print(f"test bits/dim: {summary['test_bits_per_dim']:.4f} ({summary['test_nats_per_image']:.2f} nats/image, "
              f"{summary['eval_images']} {summary['eval_split']} images) {steps}")
    if summary.get("mlflow_run_url"):
        print(f"MLflow run:    {summary['mlflow_run_url']}")
    print(f"sample grid:   {summary['samples']}")
    print(f"checkpoint:    {summary['checkpoint']}")


def cmd_launch(args) -> int:
    from .artifacts.run_folder import latest_ray_checkpoint
    from .launch.ray_train import train_distributed

    overrides = list(args.overrides)
    for flag, key in (("data", "data.shards"), ("workers", "scaling.workers"), ("gpus_per_worker", "scaling.gpus_per_worker"),
                      ("cpus_per_worker", "scaling.cpus_per_worker"), ("zero_stage", "engine.zero_stage"),
                      ("output", "train.output")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides += _register(args)
    from .config import load

    if args.data is not None:
        overrides.append("data.source=")  # stream the given shards; never rebuild them
    import torch

    if args.workers is None and args.gpus_per_worker is None and torch.cuda.is_available():
        overrides += ["scaling.workers=1", "scaling.gpus_per_worker=1"]  # the embedded default on a GPU machine
    cfg = _with_init_model(load(args.preset, args.config, overrides), args, overrides)
    resume = args.resume
    if resume == "latest":
        resume = latest_ray_checkpoint(cfg)
        if resume is None:
            raise ValueError(f"--resume latest: no checkpoint under {cfg.train.output}")
    _print_summary(train_distributed(cfg, resume=resume, verbose=args.verbose))
    return 0


def _numbers(text: str | None, kind, name: str) -> list | None:
    """'0,2,4' -> [0, 2, 4]; None stays None."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: allowed: comma-separated {kind.__name__} values, e.g. "
                         f"{'0,4,8' if kind is int else '1.0,0.8,0.6'}") from None


def cmd_evaluate(args) -> int:
    import json

    from .artifacts.images import png_bytes
    from .artifacts.storage import join, redact_all, to_fs, write_atomic
    from .tracking.logged_weights import load_weights
    from .evaluation import EvalSettings, evaluate_weights
    from .tracking.evaluation_run import record, tracking_uri, training_run_id
    from .evaluation.report import TEMPERATURES, in_process

    weights = load_weights(args.weights)
    data = args.data or weights.cfg.data.shards
    if not data:
        raise ValueError("--data is required: the run streamed no shards")
    settings = EvalSettings(split=args.split, batch_size=args.batch_size, importance_samples=args.importance_samples,
                            active_threshold=args.active_threshold, depths=_numbers(args.depths, int, "--depths"),
                            temperatures=_numbers(args.temperatures, float, "--temperatures") or TEMPERATURES,
                            seed=args.seed, shares=args.workers)
    run = in_process
    if args.workers > 1:
        from .launch.ray_eval import ray_runner
        from .core.ray_connect import init_ray

        init_ray(args.address, log=lambda m: print(m, file=sys.stderr))
        run = ray_runner(args.cpus_per_worker, args.gpus_per_worker)
    report = evaluate_weights(args.weights, data, settings, run)
    s = redact_all(report.summary)  # printed, written and recorded: no URL's secrets
    if args.output:
        fs, root = to_fs(args.output)
        for name, image in report.figures.items():
            write_atomic(fs, join(root, name), png_bytes(image))
        write_atomic(fs, join(root, "evaluation.json"), json.dumps(s, indent=2).encode())
    if args.mlflow:
        try:
            parent = args.parent_run or training_run_id(args.weights)
            uri = tracking_uri(args.tracking_uri, weights.cfg.tracking.uri)
            s["mlflow_run_id"] = record(s, report.figures, uri, weights.cfg.tracking.experiment, parent)
        except Exception as e:  # the numbers above are still printed and written
            print(f"warning: the evaluation was not recorded in MLflow ({type(e).__name__}: {e})", file=sys.stderr)
    if args.json:
        print(json.dumps(s))
        return 0
    e, i = s["elbo"], s["iwae"]
    print(f"{s['split']}: {s['images']} images, EMA weights at step {s['step']} ({s['weights']})")
    print(f"  ELBO          {e['bits_per_dim']:.4f} +- {e['bits_per_dim_stderr']:.4f} bits/dim  "
          f"({e['nats_per_image']:.2f} +- {e['nats_stderr']:.2f} nats/image)")
    print(f"  IWAE (K={s['importance_samples']:<4}) {i['bits_per_dim']:.4f} +- {i['bits_per_dim_stderr']:.4f} bits/dim  "
          f"({i['nats_per_image']:.2f} +- {i['nats_stderr']:.2f} nats/image)")
    print(f"  active latents {s['active_channels']}/{s['total_channels']} channels ({100 * s['active_fraction']:.1f}%, "
          f"KL > {s['active_threshold_nats']:g} nats per position); ELBO with only those "
          f"{s['active_elbo']['bits_per_dim']:.4f} bits/dim ({s['active_elbo']['nats_per_image']:.2f} nats/image)")
    print("  by depth (groups from the posterior -> bits/dim): "
          + ", ".join(f"{d}: {v:.4f}" for d, v in s["depth_bits_per_dim"].items()))
    if s.get("mlflow_run_id"):
        print(f"  MLflow evaluation run {s['mlflow_run_id']}")
    if args.output:
        print(f"  figures and evaluation.json in {args.output}")
    return 0


def cmd_serve(args) -> int:
    import os

    from .config import load
    from .core.ray_connect import init_ray
    from .core.ray_private import started_ray_here
    from .serve.process import check_local_model, run, stop_ray

    overrides = list(args.overrides)
    overrides += [f"serve.{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v is not None]
    cfg = load(args.preset, args.config, overrides)  # the serve.* fields; the model's config comes with it
    check_local_model(args.model)  # before Ray starts
    try:
        init_ray(args.address)  # None: the job's cluster, RAY_ADDRESS, a live `ray start` cluster, or a new local one
    except KeyboardInterrupt:  # Ctrl-C while Ray starts (from then on, run() handles SIGINT and SIGTERM)
        print("interrupted", file=sys.stderr)
        return 130
    local, served = started_ray_here(), False
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
    from .official.importer import import_checkpoint

    from .artifacts.storage import redact

    r = import_checkpoint(args.source, args.checkpoint, args.out, hparams=args.hparams, hps=args.hps)
    print(redact(f"imported {r.weights} weights ({r.parameters:,} parameters, config from {r.preset}) -> {r.out}"))
    if r.config:
        print(redact(f"run config: {r.config} (train from these weights: --config {r.config} "
                     f"--set train.init_from={args.out})"))
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


def cmd_plan(args) -> int:
    import json

    from .plan.memory_plan import Budget, build_plan, parse_memory, render

    if args.preset is None and args.config is None:
        raise ValueError("--preset is required (see `vdvae-dist params`), or --config")
    budget = Budget(parse_memory(args.gpu_memory), parse_memory(args.reserve, "--reserve"), args.fragmentation)
    cfg = _load(args)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    plan = build_plan(cfg, args.gpus, budget, args.precision, args.method, log=log)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else render(plan))
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
    from .data.manifest import read_manifest
    from .data.shardwriter import verify

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
    p.add_argument("--register", metavar="NAME", help="register the EMA weights in MLflow's model registry as NAME "
                                                      "(tracking.register_model; serve models:/NAME/latest)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("launch", help="train with Ray Train + DeepSpeed ZeRO workers (local Ray by default)")
    _config_args(p, "mnist-small")
    p.add_argument("--data", help="shard URL to stream (s3://, gs://, http(s):// read-only, file:// or a path); sets data.shards")
    p.add_argument("--workers", type=int, help="Ray Train workers (scaling.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="scaling.gpus_per_worker (0 trains on CPU)")
    p.add_argument("--cpus-per-worker", type=float, help="scaling.cpus_per_worker")
    p.add_argument("--zero-stage", type=int, help="engine.zero_stage (0, 1, 2 or 3)")
    p.add_argument("--output", help="train.output: run folder or URL (checkpoints, summary, samples)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder/URL to continue from")
    p.add_argument("--register", metavar="NAME", help="register the EMA weights in MLflow's model registry as NAME "
                                                      "(tracking.register_model; serve models:/NAME/latest)")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's own report lines")
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("evaluate", help="ELBO, importance-weighted bound, latent utilisation and depth/"
                                        "temperature studies of a run's EMA weights (every image once)")
    p.add_argument("--weights", required=True, help="a run output or checkpoint folder/URL, or its ema_fp32.pt")
    p.add_argument("--data", help="shard URL (default: the run's data.shards)")
    p.add_argument("--split", default="test", help="split to evaluate (test, val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--importance-samples", type=int, default=1, metavar="K",
                   help="K of the importance-weighted bound log mean_k p(x,z_k)/q(z_k|x) (1: the ELBO's estimate)")
    p.add_argument("--active-threshold", type=float, default=0.01,
                   help="a latent channel is active when its mean KL per position exceeds this (nats)")
    p.add_argument("--depths", help="depth study: comma-separated numbers of groups taken from the posterior "
                                    "(default: 0, 1/4, 1/2, 3/4, all)")
    p.add_argument("--temperatures", help="sample rows of the temperature figure (default 1.0,0.9,0.8,0.6)")
    p.add_argument("--seed", type=int, default=0, help="latent noise and figure seed")
    p.add_argument("--workers", type=int, default=1, help="Ray tasks sharing the split (1: this process, no Ray)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--address", help="Ray cluster address (default: the job's cluster or a local one)")
    p.add_argument("--output", help="folder or URL for the figures and evaluation.json")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of text")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                   help="do not record an MLflow evaluation run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the run's, or the "
                                          "local store)")
    p.add_argument("--parent-run", help="MLflow run id of the training run (default: from the run's summary.json)")
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
    p = sub.add_parser("plan", help="per-GPU memory under each ZeRO stage and checkpointing mode, and the largest "
                                    "micro-batch that fits")
    _config_args(p, None)
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (ZeRO ranks), >= 1")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 24GB, 40GiB (GB = GiB)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="default: the preset's engine.precision (auto = bf16, as on GPUs with native bf16)")
    p.add_argument("--reserve", default="1GiB", help="per-GPU memory kept free for the CUDA context, cuBLAS/cuDNN "
                                                     "workspaces and NCCL buffers")
    p.add_argument("--fragmentation", type=float, default=0.10,
                   help="share of GPU memory assumed lost to allocator fragmentation, 0 <= value < 1")
    p.add_argument("--method", choices=("auto", "real", "fake"), default="auto",
                   help="activation measurement: a real CPU step, fake tensors, or auto (real where the step fits "
                        "in half the free RAM and costs at most 3 TFLOP, else fake)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("params", help="parameter count of every preset")
    p.set_defaults(fn=cmd_params)
    _shards_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in shard manifests
    try:
        return args.fn(args)
    except ValueError as e:  # bad user input: one clear line, no traceback, no URL's secrets
        from .artifacts.storage import redact

        print(f"vdvae-dist: error: {redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
