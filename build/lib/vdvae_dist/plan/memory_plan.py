"""`vdvae-dist plan`: per-GPU memory of a preset under each ZeRO stage and activation
checkpointing mode, and the largest micro-batch that fits a GPU of a given size.

peak(stage, mode, b) = model states(stage) + activations(mode, b), which must fit in
usable = gpu_memory * (1 - fragmentation) - reserve. Model states: memory_states.py;
activations: memory_activations.py (measured at batch 1 and 2, a line through them)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .memory_activations import BATCHES, METHODS, MODES, ActivationFit
from .memory_states import STAGES, DeepSpeedDefaults, ModelShape, States, model_states

GiB = 2**30
_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_memory(text: str, option: str = "--gpu-memory") -> int:
    """'80GB' / '40GiB' / '512MB' -> bytes. GB and GiB both mean 2**30: GPU memory is
    quoted in binary units (an "80GB" A100 has 81920 MiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])I?B\s*", text.upper())
    if not m or float(m[1]) <= 0:
        raise ValueError(f"{option}={text!r} is not a memory size; allowed: a positive number with a unit "
                         f"KB | MB | GB | TB (or KiB ... TiB, the same binary units), e.g. 80GB, 24GB, 40GiB")
    return int(float(m[1]) * _UNITS[m[2] + "B"])


def resolve_precision(setting: str, source: str) -> tuple[bool, str]:
    """(bf16, why) for GPUs: "auto" trains in bf16 where the GPU computes it natively.
    `source` names where the setting came from (--precision or engine.precision)."""
    if setting == "auto":
        return True, (f"{source}=auto: bf16 on GPUs with native bf16 (compute capability >= 8.0, "
                      "e.g. A100, H100, RTX 30xx/40xx); pass --precision fp32 for older GPUs")
    if setting in ("bf16", "fp32"):
        return setting == "bf16", f"{source}={setting}"
    raise ValueError(f"{source}={setting!r} is unknown; allowed: auto | bf16 | fp32")


@dataclass(frozen=True)
class Budget:
    gpu_memory: int
    reserve: int
    fragmentation: float

    def __post_init__(self):
        if not 0 <= self.fragmentation < 1:
            raise ValueError(f"--fragmentation={self.fragmentation} is out of range; allowed: 0 <= value < 1")
        if self.usable <= 0:
            raise ValueError(f"--gpu-memory={self.gpu_memory / GiB:.2f}GiB leaves nothing after --reserve="
                             f"{self.reserve / GiB:.2f}GiB and --fragmentation={self.fragmentation}; allowed: a "
                             f"larger --gpu-memory or a smaller reserve")

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1 - self.fragmentation)) - self.reserve


def largest_micro_batch(states: States, act: ActivationFit, usable: int) -> int:
    """Most images per forward/backward pass with peak <= usable (0: not even one)."""
    if act.slope <= 0:  # a measurement that did not grow with the batch cannot be extrapolated
        raise RuntimeError(f"activation memory ({act.mode}, {act.method}) did not grow from batch 1 to 2: "
                           f"{act.measured}")
    room = usable - states.total
    if act.at(1) > room:
        return 0
    return max(1, (room - act.intercept) // act.slope)


@dataclass(frozen=True)
class Plan:
    preset: str
    params: int
    gpus: int
    bf16: bool
    precision_note: str
    budget: Budget
    global_batch: int
    states: list[States]
    activations: list[ActivationFit]
    notes: tuple[str, ...] = ()

    def fits(self) -> dict[int, dict[str, int]]:
        """{stage: {mode: largest micro-batch}}."""
        return {s.stage: {a.mode: largest_micro_batch(s, a, self.budget.usable) for a in self.activations}
                for s in self.states}

    def peaks(self, batch: int = 1) -> dict[int, dict[str, int]]:
        """{stage: {mode: peak bytes per GPU at this micro-batch}}."""
        return {s.stage: {a.mode: s.total + a.at(batch) for a in self.activations} for s in self.states}

    def as_dict(self) -> dict:
        b = self.budget
        return {
            "preset": self.preset, "parameters": self.params, "gpus": self.gpus,
            "precision": "bf16" if self.bf16 else "fp32", "precision_note": self.precision_note,
            "gpu_memory_bytes": b.gpu_memory, "reserve_bytes": b.reserve, "fragmentation": b.fragmentation,
            "usable_bytes": b.usable, "global_batch": self.global_batch,
            "model_states_per_gpu": {str(s.stage): s.as_dict() for s in self.states},
            "activations": {a.mode: {"method": a.method, "method_note": METHODS[a.method],
                                     "measured_batches": list(BATCHES), "measured_bytes": list(a.measured),
                                     "bytes_per_image": a.slope, "intercept_bytes": a.intercept}
                            for a in self.activations},
            "peak_bytes_at_micro_batch_1": {str(k): v for k, v in self.peaks(1).items()},
            "largest_micro_batch": {str(k): v for k, v in self.fits().items()},
            "notes": list(self.notes),
        }


def plan_precision(cfg, precision: str | None) -> tuple[bool, str]:
    """(bf16, why): --precision when given, else the config's engine.precision."""
    return (resolve_precision(precision, "--precision") if precision else
            resolve_precision(cfg.engine.precision, "engine.precision"))


def measure_activations(cfg, bf16: bool, method: str = "auto", ram_budget: int | None = None,
                        log=lambda message: None) -> list[ActivationFit]:
    """One fit per checkpointing mode; they do not depend on the GPUs, so one measurement
    serves plans for any --gpus and --gpu-memory."""
    from .memory_activations import available_ram, measure

    ram = ram_budget if ram_budget is not None else available_ram() // 2
    activations = []
    for mode in MODES:
        log(f"measuring activations: checkpointing {mode} ...")
        activations.append(measure(cfg, mode, bf16, method, ram))
    return activations


def build_plan(cfg, gpus: int, budget: Budget, precision: str | None = None, method: str = "auto",
               ram_budget: int | None = None, log=lambda message: None,
               activations: list[ActivationFit] | None = None) -> Plan:
    """The plan for `gpus` GPUs of `budget`; `activations` from measure_activations (at the
    same precision) skips measuring them again."""
    if gpus < 1:
        raise ValueError(f"--gpus={gpus} is out of range; allowed: >= 1")
    bf16, note = plan_precision(cfg, precision)
    ds = DeepSpeedDefaults.of(cfg, gpus, bf16)
    shape = ModelShape.of(cfg.model, ds.persistence_threshold)
    states = [model_states(shape, ds, stage, gpus, bf16) for stage in STAGES]
    if activations is None:
        activations = measure_activations(cfg, bf16, method, ram_budget, log)
    return Plan(cfg.preset, shape.params, gpus, bf16, note, budget, cfg.optim.batch_size, states, activations,
                _caveats(cfg))


def _caveats(cfg) -> tuple[str, ...]:
    """What the plan does not model, when the run would use it."""
    import deepspeed

    from ..engine.hooks import TESTED_DEEPSPEED

    notes = []
    if deepspeed.__version__ != TESTED_DEEPSPEED:
        notes.append(f"the buffers are modelled on deepspeed=={TESTED_DEEPSPEED}; {deepspeed.__version__} is installed")
    if cfg.engine.offload_optimizer or cfg.engine.offload_params:
        notes.append("engine.offload_optimizer/offload_params is set; this plan keeps everything on the GPU")
    return tuple(notes)


# -- text output ---------------------------------------------------------------------

def _g(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def fmt_bytes(n: int | None) -> str:
    """Bytes in the unit that reads best in a table cell: 0.93G, 12.4M."""
    if n is None:
        return "-"
    return f"{n / GiB:.2f}G" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f}M"


def render(plan: Plan) -> str:
    b, per_gpu = plan.budget, plan.global_batch / plan.gpus
    lines = [f"Memory plan: {plan.preset} ({plan.params:,} parameters) on {plan.gpus} GPU(s) of "
             f"{_g(b.gpu_memory)} GiB, {'bf16' if plan.bf16 else 'fp32'} ({plan.precision_note})",
             f"Usable per GPU: {_g(b.gpu_memory)} GiB x (1 - {b.fragmentation:g} --fragmentation) - {_g(b.reserve)} "
             f"GiB --reserve = {_g(b.usable)} GiB (G = GiB, M = MiB below)",
             "",
             "Model states per GPU (optim = fp32 master weights where separate + Adamax's 2 fp32 states; "
             "EMA = our fp32 copy; buffers = DeepSpeed's reduce / all-reduce / gather buffers)",
             f"{'stage':>5} {'params':>8} {'grads':>8} {'optim':>8} {'EMA':>8} {'buffers':>8} {'total':>8}  "
             f"DeepSpeed's own estimate (params + grads + optim)"]
    for s in plan.states:
        ds = f"{fmt_bytes(s.deepspeed_estimate)} ({s.deepspeed_estimator})" if s.deepspeed_estimate else s.deepspeed_estimator
        lines.append(f"{s.stage:>5} {fmt_bytes(s.params):>8} {fmt_bytes(s.grads):>8} {fmt_bytes(s.optimizer):>8} {fmt_bytes(s.ema):>8} "
                     f"{fmt_bytes(s.buffers):>8} {fmt_bytes(s.total):>8}  {ds}")
    lines += ["", f"Activations per GPU, measured at micro-batch {BATCHES[0]} and {BATCHES[1]}; at batch b: "
                  f"b=1 value + (b - 1) x per-image slope",
              f"{'checkpointing':>13} {'b=1':>8} {'b=2':>8} {'/image':>8}  method"]
    for a in plan.activations:
        lines.append(f"{a.mode:>13} {fmt_bytes(a.measured[0]):>8} {fmt_bytes(a.measured[1]):>8} {fmt_bytes(a.slope):>8}  "
                     f"{METHODS[a.method]}")
    lines += ["", f"Peak per GPU at micro-batch 1 (model states + activations; fits: <= {_g(b.usable)} GiB usable)",
              f"{'stage':>5} " + " ".join(f"{m:>16}" for m in MODES)]
    for stage, row in plan.peaks(1).items():
        lines.append(f"{stage:>5} " + " ".join(
            f"{fmt_bytes(row[m]) + (' fits' if row[m] <= b.usable else ' no'):>16}" for m in MODES))
    lines += ["", f"Largest micro-batch per GPU (preset batch {plan.global_batch} on {plan.gpus} GPU(s) = "
                  f"{per_gpu:g} per GPU; 0 = does not fit at batch 1)",
              f"{'stage':>5} " + " ".join(f"{m:>10}" for m in MODES)]
    for stage, row in plan.fits().items():
        lines.append(f"{stage:>5} " + " ".join(f"{row[m]:>10}" for m in MODES))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
