"""The update rule on DeepSpeed ZeRO (stages 0-3): the only module that imports deepspeed.

Gradient skipping: DeepSpeed already skips a step whose global gradient norm is invalid
(non-finite) without touching weights or optimizer state, and counts it. It has no
threshold, so we wrap the global-norm computation of the optimizer DeepSpeed builds
(private and different per stage, hence the pinned deepspeed==0.19.8 and a test per
stage): the wrapper records the true pre-clip norm and reports inf when it is >= the
threshold. The norm is global (all-reduced, or computed from all-reduced gradients), so
every rank takes the same decision. Stage 0 replicates everything: with bf16 we decide in
DeepSpeed's overflow check; in fp32 DeepSpeed steps the torch optimizer directly, so we
guard its step() and clip there.

EMA: each rank keeps an fp32 EMA of only its own fp32 master partition (stages 1/2: the
optimizer's hp fragments; stage 3: the local fp32 partition; stage 0: the full fp32
master), so an EMA update needs no communication. `full_state_dict()` gathers it into
plain fp32 weights.

World size: stages 1/2 write elastic checkpoints, which we re-partition when a run
resumes on a different number of workers; stage 0 state is whole on every rank; stage 3
refuses such a resume with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import to_dict
from ..config.schema import RunConfig
from ..train.objective import LossTerms, mean_terms, objective
from ..train.update import Outcome, check_divergence, lr_at, make_optimizer
from ..artifacts.weights import EXPORT_NAME, export_dict


def batch_split(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro-batch per worker, gradient accumulation steps) for this world size."""
    per_worker, rest = divmod(cfg.optim.batch_size, world)
    if rest:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is out of range; allowed: a multiple of the "
                         f"{world} workers")
    micro = cfg.engine.micro_batch_size or per_worker
    if per_worker % micro:
        raise ValueError(f"engine.micro_batch_size={micro} is out of range; allowed: a divisor of the "
                         f"per-worker batch {per_worker} (optim.batch_size / {world} workers)")
    return micro, per_worker // micro


def plain_torch_optimizer(cfg: RunConfig) -> bool:
    """Stage 0 in fp32: DeepSpeed steps the torch optimizer itself (no clipping, no skipping)."""
    return cfg.engine.zero_stage == 0 and not cfg.engine.bf16


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """Translate the typed config into a DeepSpeed config dict."""
    e, o = cfg.engine, cfg.optim
    if e.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={e.zero_stage} is out of range; allowed: 0 | 1 | 2 | 3")
    micro, accumulation = batch_split(cfg, world)
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage in (1, 2):
        zero["elastic_checkpoint"] = True  # re-partitionable optimizer state
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": o.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # 0 disables clipping; fp32 stage 0 clips in our step guard, after the skip decision
        "gradient_clipping": 0.0 if plain_torch_optimizer(cfg) else o.clip_norm,
        "bf16": {"enabled": e.bf16},
        "zero_optimization": zero,
        # our torch optimizer (Adamax/AdamW) avoids minutes of JIT op builds on CPU
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def noise_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the latent noise for one micro-batch, from its global position only: with a
    fixed micro-batch size a run draws the same noise on any number of workers."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeepSpeedRule:
    """Same role as train.update.UpdateRule, for a model wrapped by a DeepSpeed engine."""

    def __init__(self, model: nn.Module, cfg: RunConfig, world: int):
        import deepspeed

        self.cfg, self.stage, self.world = cfg, cfg.engine.zero_stage, world
        self.micro_batch, self.accumulation = batch_split(cfg, world)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        self._last_norm = float("nan")
        self._install_threshold(cfg.optim.skip_threshold)
        self.ema = ShardedEMA(self.engine, cfg.optim.ema_decay, self.stage)

    # -- gradient skipping ------------------------------------------------------------
    def _install_threshold(self, threshold: float) -> None:
        from deepspeed.runtime.utils import combine_grad_norm_groups

        zero = self.engine.optimizer

        def verdict(norm: float, like: torch.Tensor) -> torch.Tensor | None:
            self._last_norm = norm
            if threshold > 0 and math.isfinite(norm) and norm >= threshold:
                return torch.full_like(like, float("inf"))
            return None

        if self.stage == 0:
            self._guard_stage0(zero, verdict)
        elif self.stage == 3:
            original = zero._get_norm_groups

            def norm_groups():
                groups = original()
                total = combine_grad_norm_groups(groups)
                inf = verdict(float(total), torch.as_tensor(total, dtype=torch.float32))
                return groups if inf is None else [inf for _ in groups]

            zero._get_norm_groups = norm_groups
        else:
            original = zero.scaled_global_norm

            def scaled_global_norm(*args, **kwargs):
                total = original(*args, **kwargs)
                inf = verdict(float(total), torch.as_tensor(total, dtype=torch.float32))
                return total if inf is None else inf

            zero.scaled_global_norm = scaled_global_norm

    def _guard_stage0(self, zero, verdict) -> None:
        """Stage 0 replicates the weights and averages the gradients over ranks before
        step(), so the local gradient norm is the global one."""

        def skip(params) -> tuple[bool, torch.Tensor]:
            norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms))
            return verdict(float(norm), norm) is not None or not math.isfinite(float(norm)), norm

        if hasattr(zero, "overflow_checker"):  # bf16: DeepSpeed's unfused optimizer skips on "overflow"
            low_precision = [p for group in zero.fp16_groups for p in group]
            zero.overflow_checker.check = lambda *args, **kwargs: skip(low_precision)[0]
            return
        # fp32: the torch optimizer itself, which never skips; tell DeepSpeed via `overflow`
        original, clip = zero.step, self.cfg.optim.clip_norm
        params = [p for group in zero.param_groups for p in group["params"]]

        def guarded_step(*args, **kwargs):
            zero.overflow, norm = skip(params)
            if zero.overflow:
                return None
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
            return original(*args, **kwargs)

        zero.overflow = False
        zero.step = guarded_step

    # -- one update -------------------------------------------------------------------
    def apply(self) -> Outcome:
        """Call after the last engine.backward() of an update: sets the LR, steps (or
        skips), updates the EMA."""
        o = self.cfg.optim
        lr = lr_at(self.step, o)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self._last_norm = float("nan")
        self.engine.step()
        skipped = not self.engine.was_step_applied()
        grad_norm = self._last_norm
        if skipped:
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            self.ema.update()
        self.step += 1
        check_divergence(self.consecutive_skips, grad_norm, o)
        return Outcome(grad_norm, skipped, lr)

    # -- checkpoints ------------------------------------------------------------------
    def layout(self) -> dict:
        return {"world": self.world, "zero_stage": self.stage, "bf16": self.cfg.engine.bf16}

    def save(self, folder: str | Path, client_state: dict) -> None:
        """Every rank writes its ZeRO shards and EMA shard; rank 0 adds the full fp32 EMA
        (for evaluation, serving, and restoring the EMA under another world size) and the
        layout the checkpoint was written with."""
        folder = Path(folder)
        counters = {"step": self.step, "skipped": self.skipped, "consecutive_skips": self.consecutive_skips}
        self.engine.save_checkpoint(str(folder), tag="zero", client_state={**client_state, "rule": counters})
        rank = dist.get_rank()
        torch.save({"world": dist.get_world_size(), "shards": self.ema.local_shards()}, folder / f"ema-rank{rank:05d}.pt")
        full = self.ema.full_state_dict()
        if rank == 0:
            torch.save(export_dict(to_dict(self.cfg), full, self.step), folder / EXPORT_NAME)
            (folder / "layout.json").write_text(json.dumps(self.layout()))
        dist.barrier()

    def _check_layout(self, folder: Path) -> None:
        """Refuse, before DeepSpeed fails obscurely, a checkpoint this engine cannot load."""
        if not (folder / "layout.json").exists():
            raise ValueError(f"checkpoint {folder} has no layout.json: it was not written by this engine "
                             "(or by a vdvae-dist older than its world-size checks); start a new run")
        saved, now = json.loads((folder / "layout.json").read_text()), self.layout()
        for key in ("zero_stage", "bf16"):
            if saved[key] != now[key]:
                field = "engine." + key
                raise ValueError(f"checkpoint {folder} was written with {field}={saved[key]} and this run has "
                                 f"{field}={now[key]}; resume with {field}={saved[key]}")
        if saved["world"] != now["world"] and self.stage == 3:
            raise ValueError(
                f"checkpoint {folder} was written by {saved['world']} workers and this run has {now['world']}: "
                "DeepSpeed cannot re-partition engine.zero_stage=3 state (only through universal checkpoints, "
                f"which support Adam only); resume with scaling.workers={saved['world']}")

    def _load_elastic(self, folder: Path) -> dict:
        """Stages 1/2, on any world size. DeepSpeed's engine refuses a new world size, but its
        ZeRO optimizer can merge the elastic checkpoints of all old ranks and cut out this
        rank's partition: load the module weights through the engine, then the fp32 master
        and the optimizer state through the optimizer (private API of the pinned
        deepspeed==0.19.8, covered by tests)."""
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, BASE_OPTIMIZER_STATE_STEP

        _, client_state = self.engine.load_checkpoint(str(folder), tag="zero", load_optimizer_states=False)
        zero = self.engine.optimizer
        saved = self.engine._get_all_zero_checkpoints(str(folder), "zero")
        for sd in saved:  # torch optimizers count steps per parameter; DeepSpeed wants one per group
            sd.setdefault(BASE_OPTIMIZER_STATE_STEP, sd[BASE_OPTIMIZER_STATE][0].get("step"))
        zero._restore_from_elastic_fp32_weights(saved)
        zero._restore_elastic_base_optimizer_state(saved)
        zero._link_all_hp_params()
        zero._lazy_init_hp_params_optimizer_state()  # as after a step: state reachable per parameter
        return client_state

    def load(self, folder: str | Path) -> dict:
        folder = Path(folder)
        self._check_layout(folder)
        if self.stage in (1, 2):
            client_state = self._load_elastic(folder)
        else:
            _, client_state = self.engine.load_checkpoint(str(folder), tag="zero")
        counters = client_state["rule"]
        self.step, self.skipped = int(counters["step"]), int(counters["skipped"])
        self.consecutive_skips = int(counters["consecutive_skips"])
        mine = folder / f"ema-rank{dist.get_rank():05d}.pt"
        saved = torch.load(mine, weights_only=True) if mine.exists() else None
        if saved is not None and saved["world"] == dist.get_world_size():
            self.ema.load_local_shards(saved["shards"])
        else:  # another world size: re-partition the full EMA
            self.ema.load_full_state_dict(torch.load(folder / EXPORT_NAME, weights_only=True)["ema"])
        return client_state


def fp32_masters(engine) -> dict[int, torch.Tensor]:
    """Stage 0: the fp32 master of each module parameter, by id (full on every rank)."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_groups"):  # bf16: DeepSpeed keeps fp32 copies
        return {id(lp): hp for lps, hps in zip(zero.fp16_groups, zero.fp32_groups) for lp, hp in zip(lps, hps)}
    return {id(p): p for group in zero.param_groups for p in group["params"]}


class ShardedEMA:
    def __init__(self, engine, decay: float, stage: int):
        self.engine, self.decay, self.stage = engine, decay, stage
        self.replicated = stage == 0
        self.named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.shadow = [None if s is None else s.detach().float().clone() for s in self._sources()]

    def _sources(self) -> list[torch.Tensor | None]:
        if self.replicated:  # every rank holds the full fp32 weights
            masters = fp32_masters(self.engine)
            return [masters[id(p)] for _, p in self.named]
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            return [safe_get_local_fp32_param(p) for _, p in self.named]
        return [p._hp_mapping.get_hp_fragment() if p._hp_mapping is not None else None for _, p in self.named]

    @torch.no_grad()
    def update(self) -> None:
        pairs = [(s, c) for s, c in zip(self.shadow, self._sources()) if s is not None]
        if pairs:
            torch._foreach_lerp_([s for s, _ in pairs], [c.detach().float() for _, c in pairs], 1.0 - self.decay)

    def local_shards(self) -> list[torch.Tensor | None]:
        return [None if s is None else s.clone() for s in self.shadow]

    def load_local_shards(self, shards: list) -> None:
        assert len(shards) == len(self.shadow)
        for s, saved in zip(self.shadow, shards):
            if s is not None:
                s.copy_(saved)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every rank calls it and receives the full fp32 EMA weights."""
        out = {}
        world = dist.get_world_size()
        for (name, p), shard in zip(self.named, self.shadow):
            if self.replicated:
                out[name] = shard.clone()
            elif self.stage == 3:
                pieces = [torch.empty_like(shard) for _ in range(world)]
                dist.all_gather(pieces, shard.contiguous())
                out[name] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).clone()
            else:
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if shard is not None:
                    addr = p._hp_mapping.lp_fragment_address
                    buf.narrow(0, addr.start, addr.numel).copy_(shard.flatten())
                dist.all_reduce(buf)
                out[name] = buf.view(p.shape)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        rank = dist.get_rank()
        for (name, p), shard in zip(self.named, self.shadow):
            if shard is None:
                continue
            flat = full[name].flatten().float()
            if self.replicated:
                shard.copy_(flat.view_as(shard))
            elif self.stage == 3:
                n = shard.numel()
                piece = torch.zeros(n)
                chunk = flat[rank * n : (rank + 1) * n]
                piece[: chunk.numel()] = chunk
                shard.copy_(piece.view_as(shard))
            else:
                addr = p._hp_mapping.lp_fragment_address
                shard.copy_(flat.narrow(0, addr.start, addr.numel).view_as(shard))



def train_step(rule: DeepSpeedRule, batch_uint8: torch.Tensor, loss_cfg, sizes: torch.Tensor, seed: int,
               rank: int) -> tuple[LossTerms, Outcome]:
    """One update from this rank's share of the global batch: forward (the engine casts the
    module to bf16 when enabled), fp32 loss and engine backward per micro-batch, with the
    latent noise seeded by the micro-batch's global index; then skip-or-step and EMA."""
    expected = rule.micro_batch * rule.accumulation
    if len(batch_uint8) != expected:
        raise ValueError(f"a worker's batch has {len(batch_uint8)} images; the engine expects "
                         f"{rule.accumulation} micro-batches of {rule.micro_batch}")
    rule.engine.train()
    terms = []
    for i, micro in enumerate(batch_uint8.split(rule.micro_batch)):
        torch.manual_seed(noise_seed(seed, rule.step, rank * rule.accumulation + i))
        terms.append(objective(rule.engine(micro), rule.step, loss_cfg, sizes))
        rule.engine.backward(terms[-1].loss)
        if i + 1 < rule.accumulation:
            rule.engine.step()  # DeepSpeed's accumulation bookkeeping; updates only at the boundary
    return mean_terms(terms), rule.apply()
