"""Rank body for the DeepSpeed engine tests (spawned with torch.multiprocessing)."""
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from vdvae_dist.engine.sharded_ema import fp32_masters


def full_weights(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_stage() == 0:
        masters = fp32_masters(engine)
        return {n: masters[id(p)].detach().clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def full_exp_avg(engine):
    from deepspeed.utils import safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        masters, state = fp32_masters(engine), engine.basic_optimizer.state
        return {n: state[masters[id(p)]]["exp_avg"].clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in engine.module.named_parameters()}


def start(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def skip_and_ema(rank, world, stage, bf16, port, out):
    start(rank, world, port)
    from vdvae_dist.config import load
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.train.step import train_step
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes

    cfg = load("tiny", overrides=[f"engine.zero_stage={stage}", "optim.skip_threshold=1000", "optim.batch_size=4",
                                  "optim.ema_decay=0.5", "optim.max_consecutive_skips=0", f"engine.precision={'bf16' if bf16 else 'fp32'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rule = DeepSpeedRule(model, cfg, world)
    sizes = group_sizes(model)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    batch = lambda: torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    log = {"skipped": [], "norms": [], "unchanged": []}

    def record(outcome):
        log["skipped"].append(outcome.skipped)
        log["norms"].append(outcome.grad_norm if outcome.grad_norm == outcome.grad_norm else "nan")

    record(train_step(rule, batch(), cfg.loss, sizes, 0, rank)[1])
    for scale in (float("nan"), 1e7):  # a NaN step, then a finite step far above the threshold
        before = (full_weights(rule.engine), full_exp_avg(rule.engine), rule.ema.full_state_dict())
        rule.engine.train()
        from vdvae_dist.train.objective import objective

        elbo = rule.engine(batch())
        terms = objective(elbo, rule.step, cfg.loss, sizes)
        rule.engine.backward(terms.loss * scale)
        record(rule.apply())
        after = (full_weights(rule.engine), full_exp_avg(rule.engine), rule.ema.full_state_dict())
        log["unchanged"].append(all(same(x, y) for x, y in zip(before, after)))
    ema_before = rule.ema.full_state_dict()
    record(train_step(rule, batch(), cfg.loss, sizes, 0, rank)[1])
    w, ema = full_weights(rule.engine), rule.ema.full_state_dict()
    log["ema_lerp"] = all(torch.allclose(ema[k], 0.5 * ema_before[k] + 0.5 * w[k], atol=1e-6) for k in w)
    log["counters"] = [rule.step, rule.skipped, rule.engine.skipped_steps]
    rule.save(out, {"note": "test"})
    fresh = DeepSpeedRule(build_model(cfg.model), cfg, world)
    state = fresh.load(out)
    log["restored"] = [state["note"] == "test", fresh.step == rule.step, fresh.skipped == rule.skipped,
                       same(full_weights(fresh.engine), w), same(fresh.ema.full_state_dict(), ema)]
    with open(os.path.join(out, f"log-{rank}.json"), "w") as f:
        json.dump(log, f)
    dist.barrier()
    dist.destroy_process_group()


def tiny(stage, world, *extra):
    from vdvae_dist.config import load

    return load("tiny", overrides=[f"engine.zero_stage={stage}", "optim.batch_size=4", f"scaling.workers={world}",
                                   "optim.warmup_steps=1", "optim.lr=1e-3", *extra])


def global_batches(steps):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(steps)]


def same_global_batch(rank, world, stage, port, out):
    """Three updates from the same global batches of 4 (micro-batches of 2): 1 rank
    accumulates two micro-batches, 2 ranks take one each."""
    start(rank, world, port)
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.train.step import train_step
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes

    cfg = tiny(stage, world, "engine.micro_batch_size=2", "engine.precision=fp32", "optim.skip_threshold=0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rule = DeepSpeedRule(model, cfg, world)
    sizes, per_rank = group_sizes(model), 4 // world
    log = {"accumulation": rule.accumulation, "loss": [], "grad_norm": []}
    for batch in global_batches(3):
        terms, outcome = train_step(rule, batch[rank * per_rank:(rank + 1) * per_rank], cfg.loss, sizes, 5, rank)
        loss = terms.loss.detach().clone()
        dist.all_reduce(loss)
        log["loss"].append(loss.item() / world)
        log["grad_norm"].append(outcome.grad_norm)
    if rank == 0:
        with open(os.path.join(out, f"world-{world}.json"), "w") as f:
            json.dump(log, f)
    dist.destroy_process_group()


def change_world(rank, world, stage, port, out, phase):
    """phase "save": 2 updates, checkpoint, and the full fp32 weights / Adamax state / EMA
    written aside; phase "load": resume that checkpoint on this world size and compare."""
    start(rank, world, port)
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.train.step import train_step
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes

    cfg = tiny(stage, world, "optim.ema_decay=0.5")
    torch.manual_seed(0)
    rule = DeepSpeedRule(build_model(cfg.model), cfg, world)
    folder = os.path.join(out, "checkpoint")
    if phase == "save":
        sizes, per_rank = group_sizes(rule.engine.module), 4 // world
        for batch in global_batches(2):
            train_step(rule, batch[rank * per_rank:(rank + 1) * per_rank], cfg.loss, sizes, 5, rank)
        rule.save(folder, {})
        state = {"weights": full_weights(rule.engine), "exp_avg": full_exp_avg(rule.engine),
                 "ema": rule.ema.full_state_dict()}
        if rank == 0:
            torch.save(state, os.path.join(out, "expected.pt"))
    else:
        try:
            rule.load(folder)
        except ValueError as e:
            result = {"error": str(e)}
        else:
            expected = torch.load(os.path.join(out, "expected.pt"), weights_only=True)
            result = {"step": rule.step, "weights": same(full_weights(rule.engine), expected["weights"]),
                      "exp_avg": same(full_exp_avg(rule.engine), expected["exp_avg"]),
                      "ema": same(rule.ema.full_state_dict(), expected["ema"])}
            per_rank = 4 // world  # and training goes on from there
            terms, outcome = train_step(rule, global_batches(3)[2][rank * per_rank:(rank + 1) * per_rank], cfg.loss,
                                        group_sizes(rule.engine.module), 5, rank)
            result["next_step_applied"] = not outcome.skipped and bool(torch.isfinite(terms.loss))
        with open(os.path.join(out, f"resumed-{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def bypassed_norm_hook(rank, world, stage, port, out):
    """As if a DeepSpeed release stopped calling the method our skip hook wraps: the
    original method is put back on the optimizer, and the next applied step must raise."""
    start(rank, world, port)
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    cfg = tiny(stage, world, "engine.precision=fp32", "optim.skip_threshold=1000")
    torch.manual_seed(0)
    rule = DeepSpeedRule(build_model(cfg.model), cfg, world)
    zero = rule.engine.optimizer
    name = "_get_norm_groups" if stage == 3 else "scaled_global_norm"
    setattr(zero, name, getattr(type(zero), name).__get__(zero))
    try:
        train_step(rule, global_batches(1)[0][: 4 // world], cfg.loss, group_sizes(rule.module), 5, rank)
        result = {"error": None}
    except RuntimeError as e:
        result = {"error": str(e)}
    with open(os.path.join(out, f"bypassed-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


class _Payload:
    """What an attacker with write access to the checkpoint bucket would plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def crafted_pickle(rank, world, stage, port, out):
    """Save a checkpoint, replace DeepSpeed's optimizer-state file with a pickle that runs
    code when loaded, and resume: the load must refuse it without running it."""
    start(rank, world, port)
    import glob

    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.model import build_model

    cfg = tiny(stage, world, "engine.precision=fp32")
    rule = DeepSpeedRule(build_model(cfg.model), cfg, world)
    folder = os.path.join(out, "checkpoint")
    rule.save(folder, {})
    marker = os.path.join(out, "code-ran")
    for path in glob.glob(os.path.join(folder, "**", "*optim_states.pt"), recursive=True):
        torch.save({"payload": _Payload(marker)}, path)
    try:
        DeepSpeedRule(build_model(cfg.model), cfg, world).load(folder)
        result = {"error": None}
    except Exception as e:  # what the loader raised, for the test to inspect
        result = {"error": f"{type(e).__name__}: {e}"}
    result["code_ran"] = os.path.exists(marker)
    with open(os.path.join(out, f"crafted-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def init_from_weights(rank, world, stage, bf16, port, out, weights):
    """train.init_from under ZeRO: the raw (fp32 master) and EMA weights of every rank start
    from the given export."""
    start(rank, world, port)
    from vdvae_dist.config import load
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.train.init import initial_model

    cfg = load("tiny", overrides=[f"engine.zero_stage={stage}", f"optim.batch_size={2 * world}",
                                  f"engine.precision={'bf16' if bf16 else 'fp32'}", f"train.init_from={weights}"])
    rule = DeepSpeedRule(initial_model(cfg), cfg, world)
    given = torch.load(weights, weights_only=True)["ema"]
    raw, ema = full_weights(rule.engine), rule.ema_weights()
    result = {"raw": all(torch.equal(raw[k].float(), given[k].float()) for k in raw),
              "ema": all(torch.equal(ema[k].float(), given[k].float()) for k in ema), "step": rule.step}
    (Path(out) / f"init-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def offloaded(rank, world, stage, extra, port, out):
    """Three updates (the second with a NaN loss) with and without the offload in `extra`,
    from the same weights and batches: the project's torch optimizer on offloaded state."""
    start(rank, world, port)
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes, objective

    log = {}
    for name, offload in (("plain", []), ("offload", list(extra))):
        cfg = tiny(stage, world, "engine.precision=fp32", "optim.clip_norm=0.1", "optim.skip_threshold=0",
                   "optim.max_consecutive_skips=0", *offload)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        rule = DeepSpeedRule(model, cfg, world)
        sizes, per_rank = group_sizes(model), 4 // world
        runs = {"loss": [], "grad_norm": [], "skipped": [], "config": rule.engine.config["zero_optimization"]}
        for i, batch in enumerate(global_batches(3)):
            rule.engine.train()
            terms = objective(rule.engine(batch[rank * per_rank:(rank + 1) * per_rank]), rule.step, cfg.loss, sizes)
            rule.engine.backward(terms.loss * (float("nan") if i == 1 else 1.0))
            outcome = rule.apply()
            runs["loss"].append(terms.loss.item())
            runs["grad_norm"].append(outcome.grad_norm if outcome.grad_norm == outcome.grad_norm else "nan")
            runs["skipped"].append(outcome.skipped)
        runs["weights"] = {k: v.sum().item() for k, v in full_weights(rule.engine).items()}
        runs["ema"] = {k: v.sum().item() for k, v in rule.ema.full_state_dict().items()}
        log[name] = runs
        if name == "offload":  # a checkpoint, with DeepSpeed's own zero_to_fp32.py beside it
            rule.save(Path(out) / "checkpoint", {})
    if rank == 0:
        with open(os.path.join(out, "offload.json"), "w") as f:
            json.dump(log, f, default=str)
    dist.destroy_process_group()
