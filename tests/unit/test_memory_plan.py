"""`vdvae-dist plan`: the activation count on fake tensors against torch's MemTracker and
against a real CPU step, the model-state bytes against DeepSpeed's estimators and against
what a real DeepSpeed engine allocates, the micro-batch arithmetic and the CLI's errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vdvae_dist.cli import main
from vdvae_dist.config import load
from vdvae_dist.plan.memory_activations import BATCHES, MODES, ActivationFit, fake_bytes, real_bytes, with_mode
from vdvae_dist.plan.memory_plan import Budget, largest_micro_batch, parse_memory
from vdvae_dist.plan.memory_states import STAGES, DeepSpeedDefaults, ModelShape, model_states

MiB = 2**20
# A small layout of the tiny preset: one cell per resolution (MemTracker takes seconds per step)
SMALL = ["model.encoder=32s1,32p2,16s1,16p2,8s1,8p2,4s1,4p4,1s1", "model.decoder=1s1,4u4,4s1,8u2,8s1,16u2,16s1,32u2,32s1"]


def test_live_count_equals_torch_memtracker_through_selective_checkpointing():
    """LiveBytes (used for big presets) counts exactly what torch's MemTracker counts, on
    fake tensors, through a step that recomputes under a selective checkpoint policy."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from vdvae_dist.plan.memory_activations import _build, _model_tensors, _step

    cfg = with_mode(load("tiny", overrides=SMALL), "selective")
    with FakeTensorMode():
        model = _build(cfg, False)
        tracker = MemTracker()
        tracker.track_external(*_model_tensors(model))
        base = sum(t.untyped_storage().nbytes() for t in _model_tensors(model))
        with tracker:
            _step(model, 2, cfg.loss)
        tracked = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - base
    assert tracked > 0
    assert fake_bytes(cfg, 2, False) == tracked


@pytest.mark.parametrize("mode", MODES)
def test_fake_count_matches_a_real_cpu_step(mode):
    """The fake-tensor count (what sizes presets too big for this machine) against the peak
    resident memory of a real step, at batch 1 and 2 and in the per-image slope.
    Tolerance: 10% + 1 MiB (the real step also holds autograd bookkeeping and small
    allocations that are no tensors; measured differences are 1-18% at ~4-19 MiB)."""
    cfg = with_mode(load("tiny"), mode)
    fake = [fake_bytes(cfg, b, False) for b in BATCHES]
    real = real_bytes(cfg, False)
    for f, r in zip(fake, real):
        assert abs(r - f) <= 0.10 * f + MiB, (mode, fake, real)
    fake_slope, real_slope = fake[1] - fake[0], real[1] - real[0]
    assert abs(real_slope - fake_slope) <= 0.10 * fake_slope + MiB, (mode, fake, real)


def test_activations_grow_linearly_with_the_batch():
    """The plan extrapolates from batch 1 and 2; a step at batch 5 lands on that line
    (within 1%)."""
    cfg = with_mode(load("tiny"), "selective")
    fit = ActivationFit("selective", "fake", tuple(fake_bytes(cfg, b, True) for b in BATCHES))
    assert fit.slope > 0
    assert fake_bytes(cfg, 5, True) == pytest.approx(fit.at(5), rel=0.01)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_states_agree_with_deepspeeds_estimators(gpus):
    """bf16 stage 2: params + grads + optimizer are DeepSpeed's estimate. Stage 3 (no
    persistent parameters): ours adds the bf16 gradient partition that stage3.py allocates
    next to the fp32 gradients and its estimate leaves out. Equal up to the rounding of one
    parameter's share: we round partitions up (DeepSpeed pads them), it takes int(18 P / N)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load("ffhq256")
    ds = DeepSpeedDefaults.of(cfg, gpus, True)
    measured = ModelShape.of(cfg.model, ds.persistence_threshold)
    shape = ModelShape(measured.params, measured.largest_layer, persistent=0)
    s2, s3 = (model_states(shape, ds, stage, gpus, True) for stage in (2, 3))
    ds2 = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=gpus, cpu_offload=False)[1]
    ds3 = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, num_gpus_per_node=gpus,
                                                cpu_offload=False, cpu_offload_params=False)[1]
    assert s2.deepspeed_estimate == ds2 and s3.deepspeed_estimate == ds3
    rounding = 18  # bytes per parameter in a partition, at most one parameter's worth
    assert 0 <= s2.params + s2.grads + s2.optimizer - ds2 <= rounding
    gathered = 2 * 2 * shape.largest_layer  # DeepSpeed's "largest layer memory", ours among the buffers
    bf16_grad_partition = 2 * -(-shape.params // gpus)
    assert 0 <= s3.params + s3.grads + s3.optimizer + gathered - (ds3 + bf16_grad_partition) <= rounding
    # the EMA is one fp32 copy of this rank's share, as engine/sharded_ema.py keeps it
    assert s3.ema == s2.ema == 4 * -(-shape.params // gpus)
    assert model_states(shape, ds, 0, gpus, True).ema == 4 * shape.params


# every bf16 stage; fp32 where DeepSpeed takes another path (stage 0: our torch optimizer
# steps the weights; stage 3: the partition is the master). fp32 stages 1-2 differ from bf16
# only in element size.
CHECKED = [("bf16", stage) for stage in STAGES] + [("fp32", 0), ("fp32", 3)]


def _deepspeed_peaks(port: int) -> None:
    """Child process: a real DeepSpeed engine (1 rank, gloo) per stage and precision; prints
    the peak live tensor bytes of a second training step (all states exist by then)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from vdvae_dist.plan.live_memory import LiveBytes
    from vdvae_dist.engine.deepspeed_rule import DeepSpeedRule
    from vdvae_dist.model import build_model
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    peaks = {}
    for precision, stage in CHECKED:
        cfg = load("tiny", overrides=[f"engine.zero_stage={stage}", "optim.batch_size=1",
                                      f"engine.precision={precision}", "optim.skip_threshold=0"])
        torch.manual_seed(0)
        live = LiveBytes()
        with live:
            model = build_model(cfg.model)
            rule = DeepSpeedRule(model, cfg, 1)
            x = torch.randint(0, 256, (1, *model.data_shape), dtype=torch.uint8)
            train_step(rule, x, cfg.loss, group_sizes(model), 0)
            live.reset_peak()
            train_step(rule, x, cfg.loss, group_sizes(model), 0)
        peaks[f"{precision}/{stage}"] = live.peak
        del rule, model
    print(json.dumps(peaks))


@pytest.mark.slow
def test_plan_never_understates_a_real_deepspeed_engine():
    """Model states + activations at batch 1, per stage and precision, against the peak a
    real DeepSpeed engine reaches in a training step. The plan adds step-only buffers (fp32
    gradient copies, stage 0's all-reduce) to the activation peak, so it may overstate;
    tolerance: up to 15% for this tiny model, never under."""
    from tests.conftest import free_port

    code = f"from tests.unit.test_memory_plan import _deepspeed_peaks; _deepspeed_peaks({free_port()})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    cfg = load("tiny")
    for precision, stage in CHECKED:
        bf16 = precision == "bf16"
        ds = DeepSpeedDefaults.of(cfg, 1, bf16)
        shape = ModelShape.of(cfg.model, ds.persistence_threshold)
        planned = model_states(shape, ds, stage, 1, bf16).total + fake_bytes(cfg, 1, bf16)
        real = measured[f"{precision}/{stage}"]
        assert real <= planned <= 1.15 * real, (precision, stage, planned, real)


def test_largest_micro_batch_is_the_last_that_fits():
    cfg = load("ffhq256")
    ds = DeepSpeedDefaults.of(cfg, 8, True)
    shape = ModelShape.of(cfg.model, ds.persistence_threshold)
    act = ActivationFit("none", "fake", (3 * 2**30, 5 * 2**30))  # 1 GiB + 2 GiB per image
    for stage in STAGES:
        states = model_states(shape, ds, stage, 8, True)
        for gpu_gib in (4, 12, 24, 80):
            usable = Budget(gpu_gib * 2**30, 2**30, 0.1).usable
            b = largest_micro_batch(states, act, usable)
            if b == 0:
                assert states.total + act.at(1) > usable
            else:
                assert states.total + act.at(b) <= usable < states.total + act.at(b + 1)


def test_memory_sizes_parse_in_binary_units():
    assert parse_memory("80GB") == parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("24gb") == 24 * 2**30 and parse_memory("1.5TB") == int(1.5 * 2**40)
    assert parse_memory("512MiB") == 512 * 2**20
    for bad in ("80", "eighty GB", "-1GB", "0GB", "80GBs"):
        with pytest.raises(ValueError, match=r"--gpu-memory=.*allowed: a positive number with a unit"):
            parse_memory(bad)


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "lots"], "--gpu-memory='lots' is not a memory size; allowed:"),
    (["--gpus", "0"], "--gpus=0 is out of range; allowed: >= 1"),
    (["--fragmentation", "1.5"], "--fragmentation=1.5 is out of range; allowed: 0 <= value < 1"),
    (["--gpu-memory", "1GB"], "leaves nothing after --reserve"),
    (["--reserve", "x"], "--reserve='x' is not a memory size"),
])
def test_plan_bad_input_names_the_option(capsys, args, message):
    assert main(["plan", "--preset", "tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_plan_json_is_all_of_stdout_and_covers_every_stage_and_mode():
    """In a fresh process: DeepSpeed logs to stdout when imported, which must not reach --json."""
    done = subprocess.run([sys.executable, "-m", "vdvae_dist.cli", "plan", "--preset", "tiny", "--gpus", "2",
                           "--gpu-memory", "2GB", "--method", "fake", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["preset"] == "tiny" and plan["gpus"] == 2 and plan["precision"] == "bf16"
    assert set(plan["model_states_per_gpu"]) == {str(s) for s in STAGES}
    assert set(plan["activations"]) == set(MODES)
    for mode, a in plan["activations"].items():
        assert a["method"] == "fake" and a["measured_batches"] == list(BATCHES)
        assert a["bytes_per_image"] == a["measured_bytes"][1] - a["measured_bytes"][0] > 0
    for stage, row in plan["largest_micro_batch"].items():
        for mode, b in row.items():
            fits = plan["peak_bytes_at_micro_batch_1"][stage][mode] <= plan["usable_bytes"]
            assert (b >= 1) == fits
