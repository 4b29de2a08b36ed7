"""The update rule on DeepSpeed ZeRO (stages 1-3): the only module that imports deepspeed.

Gradient skipping: DeepSpeed already skips a step whose global gradient norm is invalid
(non-finite) without touching weights or optimizer state, and counts it. It has no
threshold, so we wrap the ZeRO optimizer's global-norm computation (private and
different per stage, hence the pinned deepspeed==0.19.8 and a test per stage): the
wrapper records the true pre-clip norm and reports inf when it is >= the threshold. The
norm is all-reduced inside DeepSpeed, so every rank takes the same decision.

EMA: each rank keeps an fp32 EMA of only its own fp32 master partition (stage 1/2: the
optimizer's hp fragments; stage 3: the local fp32 partition), so an EMA update needs no
communication. `ema_full_state_dict()` gathers it into plain fp32 weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config.schema import RunConfig
from ..train.update import Outcome, check_divergence, lr_at, make_optimizer


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """Translate the typed config into a DeepSpeed config dict."""
    e, o = cfg.engine, cfg.optim
    if e.zero_stage not in (1, 2, 3):
        raise ValueError(f"engine.zero_stage={e.zero_stage} is out of range for the DeepSpeed engine; allowed: 1 | 2 | 3 "
                         "(stage 1 keeps full weights on every rank like plain data parallelism)")
    micro = o.batch_size // world
    if micro * world != o.batch_size:
        raise ValueError(f"optim.batch_size={o.batch_size} is out of range; allowed: a multiple of the {world} workers")
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": o.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.clip_norm,  # 0 disables clipping
        "bf16": {"enabled": e.bf16},
        "zero_optimization": zero,
        # our torch optimizer (Adamax/AdamW) avoids minutes of JIT op builds on CPU
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class DeepSpeedRule:
    """Same role as train.update.UpdateRule, for a model wrapped by a DeepSpeed engine."""

    def __init__(self, model: nn.Module, cfg: RunConfig, world: int):
        import deepspeed

        self.cfg, self.stage = cfg, cfg.engine.zero_stage
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

        if self.stage == 3:
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

    # -- one update -------------------------------------------------------------------
    def apply(self) -> Outcome:
        """Call after engine.backward(loss): sets the LR, steps (or skips), updates the EMA."""
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
    def save(self, folder: str | Path, client_state: dict) -> None:
        """Every rank writes its ZeRO shards and EMA shard; rank 0 adds the full fp32 EMA
        (for evaluation, serving, and restoring the EMA under another world size)."""
        folder = Path(folder)
        counters = {"step": self.step, "skipped": self.skipped, "consecutive_skips": self.consecutive_skips}
        self.engine.save_checkpoint(str(folder), tag="zero", client_state={**client_state, "rule": counters})
        rank = dist.get_rank()
        torch.save({"world": dist.get_world_size(), "shards": self.ema.local_shards()}, folder / f"ema-rank{rank:05d}.pt")
        full = self.ema.full_state_dict()
        if rank == 0:
            torch.save(full, folder / "ema_fp32.pt")
        dist.barrier()

    def load(self, folder: str | Path) -> dict:
        folder = Path(folder)
        _, client_state = self.engine.load_checkpoint(str(folder), tag="zero")
        counters = client_state["rule"]
        self.step, self.skipped = int(counters["step"]), int(counters["skipped"])
        self.consecutive_skips = int(counters["consecutive_skips"])
        mine = folder / f"ema-rank{dist.get_rank():05d}.pt"
        saved = torch.load(mine, weights_only=True) if mine.exists() else None
        if saved is not None and saved["world"] == dist.get_world_size():
            self.ema.load_local_shards(saved["shards"])
        else:  # another world size: re-partition the full EMA
            self.ema.load_full_state_dict(torch.load(folder / "ema_fp32.pt", weights_only=True))
        return client_state


class ShardedEMA:
    def __init__(self, engine, decay: float, stage: int):
        self.engine, self.decay, self.stage = engine, decay, stage
        self.named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.shadow = [None if s is None else s.detach().float().clone() for s in self._sources()]

    def _sources(self) -> list[torch.Tensor | None]:
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
            if self.stage == 3:
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
            if self.stage == 3:
                n = shard.numel()
                piece = torch.zeros(n)
                chunk = flat[rank * n : (rank + 1) * n]
                piece[: chunk.numel()] = chunk
                shard.copy_(piece.view_as(shard))
            else:
                addr = p._hp_mapping.lp_fragment_address
                shard.copy_(flat.narrow(0, addr.start, addr.numel).view_as(shard))



def train_step(rule: DeepSpeedRule, batch_uint8: torch.Tensor, loss_cfg, sizes: torch.Tensor):
    """Forward (the engine casts the module to bf16 when enabled), fp32 loss, engine
    backward, then skip-or-step and EMA."""
    from ..train.objective import objective

    rule.engine.train()
    elbo = rule.engine(batch_uint8)
    terms = objective(elbo, rule.step, loss_cfg, sizes)
    rule.engine.backward(terms.loss)
    return terms, rule.apply()
