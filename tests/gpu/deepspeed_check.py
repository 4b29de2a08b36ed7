"""One DeepSpeed configuration of the GPU check, in its own process (world size 1):

    python -m tests.gpu.deepspeed_check STAGE PRECISION OFFLOAD OUT.json

On CUDA it runs over NCCL; with VDVAE_GPU_CHECK_ON_CPU=1 the same body runs on the CPU over
gloo (a rehearsal where no GPU is lent). It trains four updates of the tiny model through
the project's own DeepSpeedRule and train_step (the third is a NaN gradient: skipped), with
a clip that binds, reduces the logged metrics over the process group (forced on: at world
size 1 the trainer would skip it), saves a checkpoint and loads it into a second engine, and
writes what it saw for tests/gpu/test_gpu_deepspeed.py to judge."""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

on_cpu = os.environ.get("VDVAE_GPU_CHECK_ON_CPU") == "1"
os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("MASTER_PORT", "29517")
if on_cpu:
    os.environ["DS_ACCELERATOR"] = "cpu"


def dtypes_inside_a_block(module) -> list:
    """A hook on the model's first residual block records the dtype of what enters it and
    whether autocast is on there."""
    seen = []
    block = next(m for n, m in module.named_modules() if type(m).__name__.endswith("Block"))

    def hook(_m, args):
        seen.append({"input": str(args[0].dtype), "weight": str(next(_m.parameters()).dtype),
                     "autocast": torch.is_autocast_enabled(args[0].device.type)})

    block.register_forward_pre_hook(hook)
    return seen


def main(stage: int, precision: str, offload: bool, out: Path) -> None:
    dist.init_process_group("gloo" if on_cpu else "nccl", rank=0, world_size=1)
    if not on_cpu:
        torch.cuda.set_device(0)
    from vdvae_dist.config import load
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.model import build_model
    from vdvae_dist.train import loop
    from vdvae_dist.train.objective import group_sizes, objective
    from vdvae_dist.train.step import train_step

    cfg = load("tiny", overrides=[f"engine.zero_stage={stage}", f"engine.precision={precision}",
                                  f"engine.offload_optimizer={str(offload).lower()}", "optim.batch_size=4",
                                  "optim.clip_norm=0.1", "optim.skip_threshold=1e9", "optim.ema_decay=0.9",
                                  "optim.max_consecutive_skips=0", "optim.lr=1e-3", "optim.warmup_steps=0"])

    def build():
        torch.manual_seed(0)
        model = build_model(cfg.model)
        return DeepSpeedRule(model, cfg, world=1), group_sizes(model)

    rule, sizes = build()
    seen = dtypes_inside_a_block(rule.module)
    arrived = []
    rule.module.register_forward_pre_hook(lambda _m, args: arrived.append(str(args[0].device)))
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 256, (4, *rule.module.data_shape), generator=g, dtype=torch.uint8) for _ in range(4)]
    report = {"device": str(rule.device), "precision": rule.precision.name, "reason": rule.precision.reason,
              "steps": [], "rows": []}
    trainer = loop.Trainer(cfg, rule, store=None, open_tracker=None)
    loop._distributed = lambda: True  # the per-step metric reduction, forced on at world size 1
    for i, batch in enumerate(batches):
        if i == 2:  # a NaN gradient: DeepSpeed skips the step, the weights and the EMA stay
            before = {k: v.clone() for k, v in rule.ema_weights().items()}
            rule.engine.train()
            terms = objective(rule.engine(batch.to(rule.device)), rule.step, cfg.loss, sizes)
            rule.engine.backward(terms.loss * float("nan"))
            outcome = rule.apply()
            after = rule.ema_weights()
            report["nan_step"] = {"skipped": outcome.skipped,
                                  "ema_unchanged": all(torch.equal(before[k], after[k]) for k in before)}
            continue
        terms, outcome = train_step(rule, batch, cfg.loss, sizes, seed=3)
        report["steps"].append({"loss": float(terms.loss.detach()), "grad_norm": outcome.grad_norm,
                                "clipped": bool(outcome.clipped), "skipped": outcome.skipped})
        report["rows"].append(trainer._row(terms, outcome, 1.0, 0.0, 0))
    shadows = [s for s in rule.ema.shadow if s is not None]
    report["ema_devices"] = sorted({str(s.device) for s in shadows})
    report["batch_devices"] = sorted(set(arrived))
    report["inside_block"] = seen[0]
    ema = rule.ema_weights()
    report["counters"] = [rule.step, rule.skipped]
    with tempfile.TemporaryDirectory() as tmp:
        rule.save(Path(tmp), {"note": "gpu check"})
        again, _ = build()
        again.load(Path(tmp))
        reloaded = again.ema_weights()
        report["reload_equal"] = all(torch.equal(ema[k].cpu(), reloaded[k].cpu()) for k in ema)
        report["reload_counters"] = [again.step, again.skipped]
    # the final EMA weights, for comparing the stages with each other
    torch.save({k: v.detach().float().cpu() for k, v in ema.items()}, out.with_suffix(".pt"))
    out.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "offload", Path(sys.argv[4]))
