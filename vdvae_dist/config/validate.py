"""All checks of a RunConfig and their messages, in one place.

pydantic checks the types, bounds and choices annotated in schema.py; the checks that
relate several fields are plain code below. Every failure is one ValueError naming the
dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import posixpath
import typing
from typing import Any, Literal, Mapping

from pydantic import TypeAdapter, ValidationError

from .layout import Layout
from .layout import parse as parse_layout
from .schema import RunConfig

_ADAPTER = TypeAdapter(RunConfig)
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "string_too_short"}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is out of range; allowed: {allowed}")


def _legacy(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """engine.bf16 (before engine.precision): true, the old default, meant "bf16 please" and
    now reads as "auto" (bf16 where native); false reads as "fp32"."""
    engine = raw.get("engine") if isinstance(raw, Mapping) else None
    if not isinstance(engine, Mapping) or "bf16" not in engine:
        return raw
    engine = dict(engine)
    old = engine.pop("bf16")
    if isinstance(old, str) and old.strip().lower() in ("true", "false"):
        old = old.strip().lower() == "true"
    if not isinstance(old, bool):
        raise ValueError(f"engine.bf16={old!r} is out of range; allowed: true or false (engine.bf16 is replaced "
                         "by engine.precision = auto | fp32 | bf16)")
    if "precision" in engine:
        raise ValueError("engine.bf16 and engine.precision are both set; allowed: engine.precision only "
                         "(auto | fp32 | bf16)")
    engine["precision"] = "auto" if old else "fp32"
    return {**raw, "engine": engine}


def validate(raw: Mapping[str, Any]) -> RunConfig:
    """The RunConfig that plain data (TOML/YAML/JSON tables, overrides) describes, checked."""
    raw = _legacy(raw)
    try:
        cfg = _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ValueError(_explain(e.errors()[0])) from None
    _model(cfg)
    o, e, s, v = cfg.optim, cfg.engine, cfg.scaling, cfg.serve
    if o.lr_schedule != "vdvae":  # the only schedule without a decay to min_lr
        _require(o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"[0, optim.lr={o.lr}]")
    if o.lr_schedule == "efficient-vdvae":  # NarrowCosineDecay asserts the first; the others keep lr <= optim.lr
        _require(o.warmup_steps <= o.decay_start, "optim.warmup_steps", o.warmup_steps,
                 f"[0, optim.decay_start={o.decay_start}] with optim.lr_schedule = efficient-vdvae")
        _require(1 <= o.decay_start <= o.decay_steps, "optim.decay_start", o.decay_start,
                 f"[1, optim.decay_steps={o.decay_steps}] with optim.lr_schedule = efficient-vdvae (its cosine "
                 "runs on the absolute step and reaches min_lr at decay_steps; past it torch's recursion raises the rate)")
    c = cfg.loss
    if c.kl_schedule == "efficient-vdvae-linear":  # LinearBetaSchedule divides by their sum
        _require(c.kl_warmup_start + c.kl_warmup_steps >= 1, "loss.kl_warmup_steps", c.kl_warmup_steps,
                 ">= 1 when loss.kl_warmup_start = 0 with loss.kl_schedule = efficient-vdvae-linear "
                 "(for a constant beta of 1 use loss.kl_schedule = none)")
    _deepspeed_passthrough(e)
    _no_secrets("data.storage_options", cfg.data.storage_options)
    _no_secrets("train.storage_options", cfg.train.storage_options)
    if e.offload_optimizer:
        _require(e.zero_stage >= 1, "engine.offload_optimizer", True, "only with engine.zero_stage >= 1")
    if e.offload_params:
        _require(e.zero_stage == 3, "engine.offload_params", True, "only with engine.zero_stage = 3")
    # measured: torch's selective-checkpoint policy around compiled blocks gives wrong
    # gradients (torch 2.13); compiling already recomputes the cheap elementwise ops itself
    _require(e.compile == "off" or cfg.model.checkpoint_activations != "selective", "engine.compile", e.compile,
             'off with model.checkpoint_activations = selective (compiled blocks already recompute the cheap '
             'elementwise ops in backward; use checkpoint_activations = none or full with compiling)')
    d = cfg.data
    if d.val_fraction == 0:
        _require(not d.shards, "data.val_fraction", 0.0, "(0, 1) with data.shards (shards hold their own held-out split)")
    if d.order == "sequential":  # streams are shuffled per reader; workers split the images (launch refuses it)
        _require(not d.shards, "data.order", d.order, "shuffled with data.shards (streams are shuffled per reader)")
    _require(o.batch_size % s.workers == 0, "optim.batch_size", o.batch_size,
             f"a multiple of scaling.workers={s.workers}")
    if e.micro_batch_size:
        _require(o.batch_size % (s.workers * e.micro_batch_size) == 0, "engine.micro_batch_size",
                 e.micro_batch_size, f"a divisor of optim.batch_size / scaling.workers = {o.batch_size // s.workers}")
    _require(v.max_replicas == 0 or v.max_replicas >= v.replicas, "serve.max_replicas", v.max_replicas,
             f"0 (fixed replicas) or >= serve.replicas={v.replicas}")
    _require(v.max_queued_requests != 0, "serve.max_queued_requests", v.max_queued_requests,
             "-1 (no limit) or 1.. (requests each HTTP proxy queues before answering 503)")
    name = cfg.tracking.register_model
    _require(not name or registered_model_name_ok(name), "tracking.register_model", name,
             '"" (no registration) or a registered-model name: up to 256 characters, not blank, no "/" or ":", '
             'not "." and not starting with ".."')
    return cfg


# DeepSpeed config keys the project generates from its own fields (engine/config.py):
# engine.deepspeed may not set them, so one setting never has two sources.
DEEPSPEED_OWNED = {
    "train_batch_size": "optim.batch_size",
    "train_micro_batch_size_per_gpu": "engine.micro_batch_size",
    "gradient_accumulation_steps": "engine.micro_batch_size",
    "gradient_clipping": "optim.clip_norm",
    "bf16": "engine.precision",
    "fp16": "engine.precision (auto | fp32 | bf16; fp16 loss scaling is not supported)",
    "amp": "engine.precision",
    "optimizer": "optim.* (the project's own torch Adamax/AdamW, stepped by its update rule)",
    "scheduler": "optim.lr_schedule",
    "zero_allow_untested_optimizer": "nothing (the project's torch optimizer is always allowed)",
    "zero_force_ds_cpu_optimizer": "nothing (offload keeps the project's torch optimizer)",
    "zero_optimization.stage": "engine.zero_stage",
}
# sub-tables that engine.deepspeed may refine only when the project's switch turns them on
_DEEPSPEED_SWITCHED = {"zero_optimization.offload_optimizer": "engine.offload_optimizer",
                       "zero_optimization.offload_param": "engine.offload_params"}


def _deepspeed_passthrough(e) -> None:
    """engine.deepspeed: a table of DeepSpeed settings, none of them one the project owns."""
    def paths(table: Mapping[str, Any], prefix: str = ""):
        for key, value in table.items():
            yield prefix + str(key)
            if isinstance(value, Mapping):
                yield from paths(value, prefix + str(key) + ".")

    for path in paths(e.deepspeed):
        if path in DEEPSPEED_OWNED:
            raise ValueError(f"engine.deepspeed.{path} is out of range; allowed: any DeepSpeed setting but the ones "
                             f"the project sets itself ({', '.join(sorted(DEEPSPEED_OWNED))}); set "
                             f"{DEEPSPEED_OWNED[path]} instead")
        switch = _DEEPSPEED_SWITCHED.get(path)
        if switch and not getattr(e, switch.split(".")[1]):
            raise ValueError(f"engine.deepspeed.{path} is out of range without {switch} = true; allowed: set "
                             f"{switch} = true, and engine.deepspeed.{path} refines it (e.g. device, nvme_path)")


_SECRET_OPTIONS = {"key", "secret", "password", "session_token", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "client_secret", "account_key", "sas_token", "connection_string"}


def _no_secrets(field_name: str, options: Mapping[str, Any], prefix: str = "") -> None:
    """Storage options are recorded with the run (config.json, MLflow params): no secrets."""
    for key, value in options.items():
        if str(key).lower() in _SECRET_OPTIONS:
            raise ValueError(f"{field_name}.{prefix}{key} is out of range; allowed: fsspec options without secrets "
                             "(they are recorded with the run): give credentials through the environment "
                             "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or a "
                             'profile (profile = "name")')
        if isinstance(value, Mapping):
            _no_secrets(field_name, value, f"{prefix}{key}.")


def registered_model_name_ok(name: str) -> bool:
    """MLflow's rule for registered-model names (mlflow.utils.validation._validate_model_name),
    checked here so a bad name fails when the config loads, not after training."""
    norm = posixpath.normpath(name)
    return (bool(name.strip()) and len(name) <= 256 and not any(c in name for c in "/:") and norm == name
            and norm != "." and not norm.startswith(".."))


def _explain(error: Mapping[str, Any]) -> str:
    """pydantic's error in the words of `_require` (unknown keys list the allowed ones)."""
    loc, kind = error["loc"], error["type"]
    if kind == "unexpected_keyword_argument":
        section: Any = RunConfig()
        for name in loc[:-1]:
            section = getattr(section, name)
        names = ", ".join(sorted(f.name for f in dataclasses.fields(section)))
        return f"unknown key {'.'.join(loc)}; allowed keys in {'.'.join(loc[:-1]) or 'the top level'}: {names}"
    if kind == "missing":  # a list too short for its tuple: name the list
        loc = loc[:-1]
    key = ".".join(str(part) for part in loc if part != "[key]") or "config"
    allowed = _allowed(_annotation(loc), kind in _BOUND_ERRORS)
    if kind == "finite_number":  # inf or nan
        allowed = "a finite number" + ("" if allowed == "a number" else f" {allowed}")
    return f"{key}={error['input']!r} is out of range; allowed: {allowed}"


def _annotation(loc: tuple) -> Any:
    """The annotation at an error location, e.g. ("model", "widths", "32") -> PosInt."""
    tp: Any = RunConfig
    for i, part in enumerate(loc):
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True)[part]
        elif part != "[key]":  # a dict value (its key when pydantic adds "[key]") or a tuple item
            tp = typing.get_args(tp)[0 if loc[i + 1:] == ("[key]",) else -1]
    return tp


def _allowed(tp: Any, bound_error: bool) -> str:
    """What an annotation accepts, in words: "0 | 1 | 2 | 3", ">= 1", "[0, 1)", "1..8", "an integer"."""
    base, extras = (tp.__origin__, tp.__metadata__) if hasattr(tp, "__metadata__") else (tp, ())
    origin = typing.get_origin(base)
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(base)))
    if bound_error:
        b = {k: v for info in extras for m in info.metadata for k, v in dataclasses.asdict(m).items()}
        if "min_length" in b:
            return "a non-empty string"
        ops = [(op, b[k]) for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in b]
        if len(ops) == 1:
            return f"{ops[0][0]} {ops[0][1]}"
        if len(ops) == 2:
            (lo_op, lo), (hi_op, hi) = ops
            if base is int:  # integer ranges are ge..le
                return f"{lo}..{hi}"
            return f"{'[' if lo_op == '>=' else '('}{lo}, {hi}{']' if hi_op == '<=' else ')'}"
    if dataclasses.is_dataclass(base):
        return "a table"
    if origin is dict:
        return "a table like {32 = 12, 16 = 7}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(base))} values"
    return _TYPE_WORDS[base]


def resolutions(cfg: RunConfig) -> list[int]:
    """Resolutions of the hierarchy, highest first."""
    return model_layout(cfg.model).resolutions


def model_layout(m) -> Layout:
    return parse_layout(m.encoder, m.decoder, m.resolution)


def _model(cfg: RunConfig) -> None:
    m = cfg.model
    if m.likelihood == "gaussian":
        _require(m.kind == "aevb", "model.likelihood", m.likelihood, "dmol | bernoulli (gaussian only for model.kind = aevb)")
    if m.likelihood == "dmol":
        _require(m.channels == 3, "model.channels", m.channels, "3 when model.likelihood = dmol")
    if m.likelihood == "bernoulli":
        _require(m.channels == 1, "model.channels", m.channels, "1 when model.likelihood = bernoulli")
    _require(
        cfg.data.resolution + 2 * m.pad == m.resolution,
        "data.resolution",
        cfg.data.resolution,
        f"model.resolution - 2 * model.pad = {m.resolution - 2 * m.pad}",
    )
    if m.kind == "aevb":
        return
    layout = model_layout(m)
    res = layout.resolutions
    if m.design == "original":
        low = min(res)
        _require(low <= m.no_bias_above, "model.no_bias_above", m.no_bias_above,
                 f">= the lowest resolution ({low} px), where the top-down pass starts from a learned bias")
    for key, table in (("model.widths", m.widths), ("model.bottlenecks", m.bottlenecks)):
        extra = set(table) - set(res)
        _require(not extra, key, table, f"resolutions among {sorted(res)}")
    for r in res:
        w = m.widths.get(r, m.width)
        b = m.bottlenecks.get(r, m.bottleneck)
        _require(int(w * b) >= 1, f"model.bottlenecks.{r}", b, f"width * ratio >= 1 (width {w})")
    if m.design == "original":
        # VDVAE pools by zero-padding channels and upsamples by dropping them
        for u in layout.encoder + layout.decoder:
            if u.kind in ("pool", "unpool"):
                hi = u.res
                lo = hi // u.factor
                w_hi, w_lo = m.widths.get(hi, m.width), m.widths.get(lo, m.width)
                _require(w_lo >= w_hi, f"model.widths.{lo}", w_lo,
                         f">= the width at {hi} px ({w_hi}) in the original design")
