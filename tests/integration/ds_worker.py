"""Rank body for the DeepSpeed engine tests (spawned with torch.multiprocessing)."""
import json
import os

import torch
import torch.distributed as dist


def full_weights(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def full_exp_avg(engine):
    from deepspeed.utils import safe_get_full_optimizer_state

    return {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in engine.module.named_parameters()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def skip_and_ema(rank, world, stage, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from vdvae_dist.config import load
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule, train_step
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes

    cfg = load("tiny", overrides=[f"engine.zero_stage={stage}", "optim.skip_threshold=1000", "optim.batch_size=4",
                                  "optim.ema_decay=0.5", "optim.max_consecutive_skips=0", "engine.bf16=true"])
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

    record(train_step(rule, batch(), cfg.loss, sizes)[1])
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
    record(train_step(rule, batch(), cfg.loss, sizes)[1])
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
