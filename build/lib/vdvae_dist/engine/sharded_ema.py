"""An fp32 EMA of the weights kept sharded like the optimizer: each rank averages only its
own fp32 master partition (stages 1/2: the optimizer's hp fragments; stage 3: the local
fp32 partition; stage 0: the full fp32 master), so an update needs no communication.
`full_state_dict()` gathers plain fp32 weights; `load_full_state_dict` re-partitions them
(a resume on another number of workers)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..train.ema import ema_rates, ema_update_


def fp32_masters(engine) -> dict[int, torch.Tensor]:
    """Stage 0: the fp32 master of each module parameter, by id (full on every rank)."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_groups"):  # bf16: DeepSpeed keeps fp32 copies
        return {id(lp): hp for lps, hps in zip(zero.fp16_groups, zero.fp32_groups) for lp, hp in zip(lps, hps)}
    return {id(p): p for group in zero.param_groups for p in group["params"]}


class ShardedEMA:
    def __init__(self, engine, decay: float, stage: int, as_float32: bool = False):
        self.engine, self.stage = engine, stage
        self.keep, self.take = ema_rates(decay, as_float32)
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
        ema_update_([s for s, _ in pairs], [c.detach().float() for _, c in pairs], self.keep, self.take)

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
                local = shard.to(p.device).contiguous()  # offloaded partitions live on the CPU; NCCL wants CUDA
                pieces = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(pieces, local)
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
