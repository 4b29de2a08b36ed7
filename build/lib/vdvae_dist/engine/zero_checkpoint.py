"""Checkpoints of a DeepSpeed rule: every rank writes its ZeRO shards and EMA shard, rank 0
adds the full fp32 EMA export and the layout it was written with.

World size: stages 1/2 write elastic checkpoints, which we re-partition when a run
resumes on a different number of workers; stage 0 state is whole on every rank; stage 3
refuses such a resume with a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..artifacts.run_folder import EXPORT_NAME, ZERO_LAYOUT_FILE, ZERO_TAG, ema_shard_file
from ..artifacts.weights import save_export
from ..train.rule import counters, restore_counters


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes that its checkpoints pickle (found by loading every file of
    stages 0-3, fp32 and bf16, of the tested release weights-only): plain data holders
    without custom unpickling, so allowing them runs no code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_reads(engine) -> None:
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False): whoever can
    write the checkpoint bucket would run code on every worker at the next restart. Route
    this engine's reads through a weights-only load instead."""
    checkpoint_engine = engine.checkpoint_engine
    safe = deepspeed_safe_globals()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


def layout(rule) -> dict:
    return {"world": rule.world, "zero_stage": rule.stage, "bf16": rule.bf16}


def save(rule, folder: Path, client_state: dict) -> None:
    rule.engine.save_checkpoint(str(folder), tag=ZERO_TAG, client_state={**client_state, "rule": counters(rule)})
    rank = dist.get_rank()
    torch.save({"world": dist.get_world_size(), "shards": rule.ema.local_shards()}, folder / ema_shard_file(rank))
    full = rule.ema.full_state_dict()
    if rank == 0:
        save_export(folder / EXPORT_NAME, rule.cfg, full, rule.step)
        (folder / ZERO_LAYOUT_FILE).write_text(json.dumps(layout(rule)))
    dist.barrier()


def check_layout(rule, folder: Path) -> None:
    """Refuse, before DeepSpeed fails obscurely, a checkpoint this engine cannot load."""
    if not (folder / ZERO_LAYOUT_FILE).exists():
        raise ValueError(f"checkpoint {folder} has no {ZERO_LAYOUT_FILE}: it was not written by this engine "
                         "(or by a vdvae-dist older than its world-size checks); start a new run")
    saved, now = json.loads((folder / ZERO_LAYOUT_FILE).read_text()), layout(rule)
    if saved["zero_stage"] != now["zero_stage"]:
        raise ValueError(f"checkpoint {folder} was written with engine.zero_stage={saved['zero_stage']} and this "
                         f"run has engine.zero_stage={now['zero_stage']}; resume with "
                         f"engine.zero_stage={saved['zero_stage']}")
    if saved["bf16"] != now["bf16"]:  # DeepSpeed keeps different optimizer state for each
        want = "bf16" if saved["bf16"] else "fp32"
        raise ValueError(f"checkpoint {folder} was trained in {want} and this run resolved engine.precision to "
                         f"{rule.precision}; resume with engine.precision={want}")
    if saved["world"] != now["world"] and rule.stage == 3:
        raise ValueError(
            f"checkpoint {folder} was written by {saved['world']} workers and this run has {now['world']}: "
            "DeepSpeed cannot re-partition engine.zero_stage=3 state (only through universal checkpoints, "
            f"which support Adam only); resume with scaling.workers={saved['world']}")


def _load_elastic(engine, folder: Path) -> dict:
    """Stages 1/2, on any world size. DeepSpeed's engine refuses a new world size, but its
    ZeRO optimizer can merge the elastic checkpoints of all old ranks and cut out this
    rank's partition: load the module weights through the engine, then the fp32 master
    and the optimizer state through the optimizer (private API of the tested DeepSpeed)."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, BASE_OPTIMIZER_STATE_STEP

    _, client_state = engine.load_checkpoint(str(folder), tag=ZERO_TAG, load_optimizer_states=False)
    zero = engine.optimizer
    saved = engine._get_all_zero_checkpoints(str(folder), ZERO_TAG)
    for sd in saved:  # torch optimizers count steps per parameter; DeepSpeed wants one per group
        sd.setdefault(BASE_OPTIMIZER_STATE_STEP, sd[BASE_OPTIMIZER_STATE][0].get("step"))
    zero._restore_from_elastic_fp32_weights(saved)
    zero._restore_elastic_base_optimizer_state(saved)
    zero._link_all_hp_params()
    zero._lazy_init_hp_params_optimizer_state()  # as after a step: state reachable per parameter
    return client_state


def load(rule, folder: Path) -> dict:
    check_layout(rule, folder)
    if rule.stage in (1, 2):
        client_state = _load_elastic(rule.engine, folder)
    else:
        _, client_state = rule.engine.load_checkpoint(str(folder), tag=ZERO_TAG)
    restore_counters(rule, client_state["rule"])
    mine = folder / ema_shard_file(dist.get_rank())
    saved = torch.load(mine, map_location="cpu", weights_only=True) if mine.exists() else None
    if saved is not None and saved["world"] == dist.get_world_size():
        rule.ema.load_local_shards(saved["shards"])
    else:  # another world size: re-partition the full EMA
        rule.ema.load_full_state_dict(torch.load(folder / EXPORT_NAME, map_location="cpu", weights_only=True)["ema"])
    return client_state
