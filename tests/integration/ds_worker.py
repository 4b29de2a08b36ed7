"""Rank bodies for the DeepSpeed engine tests (spawned with torch.multiprocessing).

A spawn (process start, DeepSpeed import, gloo rendezvous) costs far more than a ZeRO rule on
the tiny model, so each spawn runs a whole family of checks, stage after stage, in one process
group (`family`): each check returns a JSON-able dict, written per rank as <phase>-<rank>.json;
tensors the test compares go to .pt files beside it."""
import gc
import glob
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from vdvae_dist.engine.sharded_ema import fp32_masters

BATCH = 4  # global batch of every check


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


def tiny(stage, world, *extra):
    from vdvae_dist.config import load

    return load("tiny", overrides=[f"engine.zero_stage={stage}", f"optim.batch_size={BATCH}",
                                   f"scaling.workers={world}", "optim.warmup_steps=1", "optim.lr=1e-3", *extra])


def global_batches(steps):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (BATCH, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(steps)]


def share(batch, rank, world):
    per_rank = BATCH // world
    return batch[rank * per_rank:(rank + 1) * per_rank]


def new_rule(cfg, world, seed=0):
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.model import build_model

    torch.manual_seed(seed)
    return DeepSpeedRule(build_model(cfg.model), cfg, world)


def done_with(rule):
    """Free a rule's engine before the next one is built (a ZeRO-3 engine holds hooks)."""
    rule.engine.destroy()
    gc.collect()


class Scaled:
    """An update rule whose loss is multiplied by `scale` before backward (a NaN step, or a
    finite one far above the skip threshold), everything else the rule's own."""

    def __init__(self, rule, scale):
        self.rule, self.scale = rule, scale

    def __getattr__(self, name):
        return getattr(self.rule, name)

    def backward(self, loss, last):
        self.rule.backward(loss * self.scale, last)


def global_mean(x):
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def norm_or_nan(outcome):
    return outcome.grad_norm if outcome.grad_norm == outcome.grad_norm else "nan"


# -- the checks --------------------------------------------------------------------------
def skip_and_ema(rank, world, stage, bf16, out):
    """A step, a NaN step, a finite step above the threshold, a step: the skipped ones touch
    no weight, optimizer state or EMA, every rank takes the same decision; the EMA follows
    ema <- 0.9 ema + 0.1 w (a decay where swapping its two weights shows); a checkpoint
    restores it all."""
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    cfg = tiny(stage, world, "optim.skip_threshold=1000", "optim.ema_decay=0.9", "optim.max_consecutive_skips=0",
               f"engine.precision={'bf16' if bf16 else 'fp32'}")
    rule = new_rule(cfg, world)
    sizes = group_sizes(rule.module)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    batch = lambda: torch.randint(0, 256, (BATCH // world, 3, 32, 32), generator=g, dtype=torch.uint8)
    log = {"skipped": [], "norms": [], "unchanged": []}

    def record(outcome):
        log["skipped"].append(outcome.skipped)
        log["norms"].append(norm_or_nan(outcome))

    record(train_step(rule, batch(), cfg.loss, sizes, 0, rank)[1])
    for scale in (float("nan"), 1e7):
        before = (full_weights(rule.engine), full_exp_avg(rule.engine), rule.ema.full_state_dict())
        record(train_step(Scaled(rule, scale), batch(), cfg.loss, sizes, 0, rank)[1])
        after = (full_weights(rule.engine), full_exp_avg(rule.engine), rule.ema.full_state_dict())
        log["unchanged"].append(all(same(x, y) for x, y in zip(before, after)))
    ema_before = rule.ema.full_state_dict()
    record(train_step(rule, batch(), cfg.loss, sizes, 0, rank)[1])
    w, ema = full_weights(rule.engine), rule.ema.full_state_dict()
    log["ema_lerp"] = all(torch.allclose(ema[k], 0.9 * ema_before[k] + 0.1 * w[k], rtol=0, atol=1e-6) for k in w)
    log["ema_moved"] = not same(ema, ema_before)
    log["counters"] = [rule.step, rule.skipped, rule.engine.skipped_steps]
    folder = Path(out) / f"skip-{stage}-{'bf16' if bf16 else 'fp32'}"
    rule.save(folder, {"note": "test"})
    log["export_written"] = (folder / "ema_fp32.pt").exists()
    fresh = new_rule(cfg, world, seed=1)  # other initial weights: the checkpoint must replace them
    state = fresh.load(folder)
    log["restored"] = [state["note"] == "test", fresh.step == rule.step, fresh.skipped == rule.skipped,
                       same(full_weights(fresh.engine), w), same(fresh.ema.full_state_dict(), ema)]
    done_with(rule), done_with(fresh)
    return log


def same_global_batch(rank, world, stage):
    """Three updates from the same global batches of 4 (micro-batches of 2): 1 rank
    accumulates two micro-batches, 2 ranks take one each."""
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    cfg = tiny(stage, world, "engine.micro_batch_size=2", "engine.precision=fp32", "optim.skip_threshold=0")
    rule = new_rule(cfg, world)
    sizes = group_sizes(rule.module)
    log = {"accumulation": rule.accumulation, "loss": [], "grad_norm": []}
    for batch in global_batches(3):
        terms, outcome = train_step(rule, share(batch, rank, world), cfg.loss, sizes, 5, rank)
        log["loss"].append(global_mean(terms.loss))
        log["grad_norm"].append(outcome.grad_norm)
    done_with(rule)
    return log


def resume_save(rank, world, stage, out):
    """2 updates, a checkpoint, and the full fp32 weights / Adamax state / EMA written aside."""
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    cfg = tiny(stage, world, "optim.ema_decay=0.5")
    rule = new_rule(cfg, world)
    for batch in global_batches(2):
        train_step(rule, share(batch, rank, world), cfg.loss, group_sizes(rule.module), 5, rank)
    rule.save(Path(out) / f"resume-{stage}", {})
    state = {"weights": full_weights(rule.engine), "exp_avg": full_exp_avg(rule.engine),
             "ema": rule.ema.full_state_dict()}
    if rank == 0:
        torch.save(state, Path(out) / f"resume-{stage}-expected.pt")
    dist.barrier()
    done_with(rule)
    return {}


def resume_load(rank, world, stage, out, folder=None):
    """Resume resume_save's checkpoint on this world size: the same state, and training goes on."""
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    cfg = tiny(stage, world, "optim.ema_decay=0.5")
    rule = new_rule(cfg, world)
    try:
        rule.load(Path(folder or Path(out) / f"resume-{stage}"))
    except Exception as e:  # what the loader raised, for the test to inspect
        result = {"error": f"{type(e).__name__}: {e}"}
    else:
        expected = torch.load(Path(out) / f"resume-{stage}-expected.pt", weights_only=True)
        result = {"step": rule.step, "weights": same(full_weights(rule.engine), expected["weights"]),
                  "exp_avg": same(full_exp_avg(rule.engine), expected["exp_avg"]),
                  "ema": same(rule.ema.full_state_dict(), expected["ema"])}
        terms, outcome = train_step(rule, share(global_batches(3)[2], rank, world), cfg.loss,
                                    group_sizes(rule.module), 5, rank)
        result["next_step_applied"] = not outcome.skipped and bool(torch.isfinite(terms.loss))
    dist.barrier()
    done_with(rule)
    return result


def bypassed_norm_hook(rank, world, stage):
    """As if a DeepSpeed release stopped calling the method our skip hook wraps: the
    original method is put back on the optimizer, and the next applied step must raise."""
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    cfg = tiny(stage, world, "engine.precision=fp32", "optim.skip_threshold=1000")
    rule = new_rule(cfg, world)
    zero = rule.engine.optimizer
    name = "_get_norm_groups" if stage == 3 else "scaled_global_norm"
    setattr(zero, name, getattr(type(zero), name).__get__(zero))
    try:
        train_step(rule, share(global_batches(1)[0], rank, world), cfg.loss, group_sizes(rule.module), 5, rank)
        result = {"error": None}
    except RuntimeError as e:
        result = {"error": str(e)}
    done_with(rule)
    return result


class _Payload:
    """What an attacker with write access to the checkpoint bucket would plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def crafted_pickle(rank, world, stage, out):
    """Save a checkpoint; in one copy replace DeepSpeed's optimizer-state files, in another
    our EMA shard of this rank, by a pickle that runs code when loaded; resuming either must
    refuse it without running it."""
    cfg = tiny(stage, world, "engine.precision=fp32")
    rule = new_rule(cfg, world)
    base = Path(out) / f"crafted-{stage}"
    rule.save(base / "checkpoint", {})
    done_with(rule)
    result = {}
    for target, pattern in (("optimizer", "**/*optim_states.pt"), ("ema_shard", f"ema-rank{rank:05d}.pt")):
        folder, marker = base / target, base / f"code-ran-{target}-{rank}"
        if rank == 0:
            shutil.copytree(base / "checkpoint", folder)
        dist.barrier()
        for path in glob.glob(str(folder / pattern), recursive=True):
            torch.save({"payload": _Payload(str(marker))}, path)
        dist.barrier()
        fresh = new_rule(cfg, world)
        try:
            fresh.load(folder)
            result[target] = {"error": None}
        except Exception as e:  # what the loader raised, for the test to inspect
            result[target] = {"error": f"{type(e).__name__}: {e}"}
        result[target]["code_ran"] = marker.exists()
        done_with(fresh)
    return result


def init_from_weights(rank, world, stage, bf16, weights):
    """train.init_from under ZeRO: the raw (fp32 master) and EMA weights of every rank start
    from the given export."""
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
    done_with(rule)
    return result


# Stage comparison: binding clipping on every applied step, and the third step skipped (its
# loss scaled far above optim.skip_threshold); a decay of 0.9 makes the EMA formula visible.
COMPARED = ("engine.micro_batch_size=2", "engine.precision=fp32", "optim.clip_norm=0.05", "optim.skip_threshold=1000",
            "optim.ema_decay=0.9", "optim.max_consecutive_skips=0")
COMPARED_SCALES = (1.0, 1.0, 1e6, 1.0, 1.0)


def run_compared(rule, cfg, rank, world):
    """COMPARED_SCALES updates on global batches of 4 in micro-batches of 2 (the latent noise
    follows the micro-batch's global index, so any split of the batch draws the same)."""
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    sizes = group_sizes(rule.module)
    log = {"loss": [], "grad_norm": [], "skipped": [], "clipped": []}
    for batch, scale in zip(global_batches(len(COMPARED_SCALES)), COMPARED_SCALES):
        terms, outcome = train_step(Scaled(rule, scale), share(batch, rank, world), cfg.loss, sizes, 5, rank)
        log["loss"].append(global_mean(terms.loss) if world > 1 else terms.loss.item())
        log["grad_norm"].append(outcome.grad_norm)
        log["skipped"].append(outcome.skipped)
        log["clipped"].append(outcome.clipped)
    return log


def stages_compared(rank, world, out):
    """ZeRO stages 0-3 in fp32 on `world` ranks from the same weights and batches, then (rank
    0) the single-process torch rule on the whole batches: logs and final weights / EMA."""
    from vdvae_dist.model import build_model
    from vdvae_dist.train.torch_rule import TorchRule

    logs = {}
    for stage in (0, 1, 2, 3):
        cfg = tiny(stage, world, *COMPARED)
        rule = new_rule(cfg, world)
        logs[f"stage{stage}"] = run_compared(rule, cfg, rank, world)
        state = {"weights": full_weights(rule.engine), "ema": rule.ema.full_state_dict()}
        if rank == 0:
            torch.save(state, Path(out) / f"compared-stage{stage}.pt")
        done_with(rule)
    if rank == 0:
        cfg = tiny(0, 1, *COMPARED)
        torch.manual_seed(0)
        rule = TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))
        logs["torch"] = run_compared(rule, cfg, 0, 1)
        weights = {n: p.detach().clone() for n, p in rule.module.named_parameters()}
        torch.save({"weights": weights, "ema": rule.ema_weights()}, Path(out) / "compared-torch.pt")
    dist.barrier()
    return logs


# -- the families: what one spawn runs ---------------------------------------------------
def family(rank, world, port, out, phase, weights=None):
    """phase "one-a" (1 rank), "two" (2 ranks), "one-b" (1 rank), run in this order: resumes
    cross world sizes both ways (stage 1 saved by one rank and resumed by two; stages 0, 2, 3
    saved by two ranks and resumed by one)."""
    start(rank, world, port)
    log = {}
    if phase == "one-a":
        resume_save(rank, world, 1, out)
        for stage in (2, 3):
            log[f"global_batch-{stage}"] = same_global_batch(rank, world, stage)
            log[f"bypassed-{stage}"] = bypassed_norm_hook(rank, world, stage)
            log[f"crafted-{stage}"] = crafted_pickle(rank, world, stage, out)
    elif phase == "two":
        log["resumed-1"] = resume_load(rank, world, 1, out)
        log["compared"] = stages_compared(rank, world, out)
        for stage, bf16 in ((0, False), (0, True), (1, True), (2, True), (3, True)):
            log[f"skip-{stage}-{bf16}"] = skip_and_ema(rank, world, stage, bf16, out)
        for stage in (2, 3):
            log[f"global_batch-{stage}"] = same_global_batch(rank, world, stage)
        for stage in (0, 2, 3):
            resume_save(rank, world, stage, out)
        for stage, bf16 in ((0, False), (0, True), (2, True), (3, True)):
            log[f"init-{stage}-{bf16}"] = init_from_weights(rank, world, stage, bf16, weights)
    elif phase == "one-b":
        for stage in (0, 2, 3):
            log[f"resumed-{stage}"] = resume_load(rank, world, stage, out)
        # a resume on another world size reads the full EMA export instead of the shards
        tampered = Path(out) / "resume-2-tampered"
        shutil.copytree(Path(out) / "resume-2", tampered)
        marker = Path(out) / "code-ran-export"
        export = torch.load(tampered / "ema_fp32.pt", weights_only=True)
        torch.save({**export, "ema": {"payload": _Payload(str(marker))}}, tampered / "ema_fp32.pt")
        log["crafted-export"] = resume_load(rank, world, 2, out, folder=tampered)
        log["crafted-export"]["code_ran"] = marker.exists()
    else:
        raise ValueError(f"phase={phase!r}")
    (Path(out) / f"{phase}-{rank}.json").write_text(json.dumps(log, default=str))
    dist.barrier()
    dist.destroy_process_group()


def offloaded(rank, world, port, out):
    """For stages 1 and 3: three updates (the second with a NaN loss) with and without
    offload, from the same weights and batches: the project's torch optimizer on offloaded
    state; the offloaded run's checkpoint kept for zero_to_fp32.py."""
    start(rank, world, port)
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    extras = {  # stages 1 and 2 share DeepSpeed's optimizer class (stage_1_and_2.py) and its offload path
        1: ["engine.offload_optimizer=true", "engine.deepspeed.zero_optimization.offload_optimizer={pin_memory=false}"],
        3: ["engine.offload_params=true", "engine.offload_optimizer=true"]}
    log = {}
    for stage, extra in extras.items():
        for name, offload in (("plain", []), ("offload", extra)):
            cfg = tiny(stage, world, "engine.precision=fp32", "optim.clip_norm=0.1", "optim.skip_threshold=0",
                       "optim.max_consecutive_skips=0", *offload)
            rule = new_rule(cfg, world)
            sizes = group_sizes(rule.module)
            runs = {"loss": [], "grad_norm": [], "skipped": [], "config": rule.engine.config["zero_optimization"]}
            for i, batch in enumerate(global_batches(3)):
                scaled = Scaled(rule, float("nan") if i == 1 else 1.0)
                terms, outcome = train_step(scaled, share(batch, rank, world), cfg.loss, sizes, 5, rank)
                runs["loss"].append(terms.loss.item())
                runs["grad_norm"].append(norm_or_nan(outcome))
                runs["skipped"].append(outcome.skipped)
            runs["weights"] = {k: v.sum().item() for k, v in full_weights(rule.engine).items()}
            runs["ema"] = {k: v.sum().item() for k, v in rule.ema.full_state_dict().items()}
            log[f"{stage}-{name}"] = runs
            if name == "offload":  # a checkpoint, with DeepSpeed's own zero_to_fp32.py beside it
                rule.save(Path(out) / f"checkpoint-{stage}", {})
            done_with(rule)
    if rank == 0:
        (Path(out) / "offload.json").write_text(json.dumps(log, default=str))
    dist.barrier()
    dist.destroy_process_group()
