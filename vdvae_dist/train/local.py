"""Single-process trainer (one CPU or one GPU): progress bar, periodic atomic
checkpoints, resume, an exact evaluation pass with the EMA weights and a sample grid."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import RunConfig, to_dict
from ..data.pipeline import open_training_data
from ..model import build_model, count_parameters
from ..model import bits_per_dim
from . import checkpoint
from ..artifacts.images import save_grid
from .objective import group_sizes
from .step import eval_nelbo, train_step
from .update import UpdateRule
from ..artifacts.weights import EXPORT_NAME, export_dict


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but no CUDA device is visible; allowed here: auto | cpu")
    return torch.device(name)


def evaluate(model, batches, device, bf16: bool) -> tuple[float, int]:
    """Exact pass: mean negative ELBO in nats per image, and data dimensions per image."""
    total, count, dims = 0.0, 0, 0
    for batch in batches:
        nelbo, dims = eval_nelbo(model, batch.to(device), bf16)
        total += float(nelbo.sum())
        count += len(batch)
    return total / count, dims


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_local(cfg: RunConfig, resume: bool = True, log=print) -> dict:
    device = pick_device(cfg.engine.device)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output)
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    rule = UpdateRule(model, cfg.optim)
    sizes = group_sizes(model)
    data_state = None

    found = checkpoint.latest(ckpt_dir) if resume else None
    if found is not None:
        state = checkpoint.load(found, device)
        if state["config"]["model"] != to_dict(cfg)["model"]:
            raise ValueError(f"checkpoint {found} was trained with a different model config; "
                             f"use a new train.output or pass --no-resume")
        model.load_state_dict(state["model"])
        rule.load_state_dict(state["rule"])
        data_state = state["data"]
        _set_rng_state(state["rng"])
        log(f"resumed from {found} at step {rule.step}")

    data = open_training_data(cfg.data, cfg.optim.batch_size, cfg.train.seed, state=data_state,
                              pin_memory=device.type == "cuda", log=log)
    log(f"model {cfg.model.kind}/{cfg.model.design}: {count_parameters(model):,} parameters, "
        f"{data.description}, device {device}")

    def save_checkpoint() -> Path:
        state = {"model": model.state_dict(), "rule": rule.state_dict(), "ema": rule.ema.state_dict(),
                 "data": data.state_dict(), "rng": _rng_state(), "config": to_dict(cfg),
                 "step": rule.step}
        return checkpoint.save(ckpt_dir, rule.step, state, cfg.train.keep_checkpoints)

    metrics_path = out / "metrics.jsonl"
    bar = tqdm(total=cfg.optim.total_steps, initial=rule.step, desc="train", unit="step", dynamic_ncols=True)
    t_last, n_last, wait = time.perf_counter(), 0, 0.0
    with open(metrics_path, "a") as metrics_file:
        while rule.step < cfg.optim.total_steps:
            t_wait = time.perf_counter()
            batch = next(data).to(device, non_blocking=True)
            wait += time.perf_counter() - t_wait
            terms, outcome = train_step(model, rule, batch, cfg.loss, sizes, cfg.engine.bf16)
            bar.update(1)
            n_last += len(batch)
            if rule.step % cfg.train.log_every == 0 or rule.step == cfg.optim.total_steps:
                now = time.perf_counter()
                row = {"step": rule.step, "nelbo_nats_per_dim": float(terms.nelbo), "recon": float(terms.recon),
                       "kl": float(terms.kl), "bits_per_dim": bits_per_dim(float(terms.nelbo), 1),
                       "grad_norm": outcome.grad_norm, "lr": outcome.lr, "skipped": rule.skipped,
                       "beta": terms.beta, "images_per_s": n_last / (now - t_last),
                       "data_wait_fraction": wait / (now - t_last), "bad_samples": data.bad_samples}
                t_last, n_last, wait = now, 0, 0.0
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(bpd=f"{row['bits_per_dim']:.3f}", gnorm=f"{outcome.grad_norm:.3g}",
                                skipped=rule.skipped)
            if cfg.train.checkpoint_every and rule.step % cfg.train.checkpoint_every == 0:
                save_checkpoint()
    bar.close()
    final = save_checkpoint()

    ema_model = rule.ema.model
    nelbo, dims = evaluate(ema_model, data.eval_pass(cfg.optim.batch_size), device, cfg.engine.bf16)
    samples = ema_model.sample(cfg.train.grid_samples, cfg.train.grid_temperature, seed=cfg.train.seed)
    grid = save_grid(samples.cpu(), out / "samples.png")
    summary = {"step": rule.step, "skipped": rule.skipped, "eval_split": data.eval_split,
               "eval_images": data.n_eval, "test_nats_per_image": nelbo,
               "test_bits_per_dim": bits_per_dim(nelbo, dims), "checkpoint": str(final),
               "samples": str(grid), "metrics": str(metrics_path), "weights": str(out / EXPORT_NAME)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    scores = {k: summary[k] for k in ("test_bits_per_dim", "test_nats_per_image", "eval_split", "eval_images")}
    ema_cpu = {k: v.detach().cpu() for k, v in ema_model.state_dict().items()}
    checkpoint.save_file(out / EXPORT_NAME, export_dict(to_dict(cfg), ema_cpu, rule.step, scores))
    return summary
