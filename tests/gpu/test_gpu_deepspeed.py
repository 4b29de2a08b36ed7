"""DeepSpeed on one CUDA device over NCCL (world size 1): ZeRO stages 0-3 in bf16 and fp32
and optimizer offload, each in its own process (tests/gpu/deepspeed_check.py). Checks that
bf16 is chosen on a GPU that has it and reaches the blocks, that batches and the EMA live on
CUDA, that the binding clip and a NaN skip behave, that the metric reduction runs on NCCL,
that a checkpoint reloads exactly, and that all stages agree with each other.

Skipped without CUDA; VDVAE_GPU_CHECK_ON_CPU=1 rehearses the fp32 cases on the CPU (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ON_CPU = os.environ.get("VDVAE_GPU_CHECK_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                                                  reason="needs a CUDA device (VDVAE_GPU_CHECK_ON_CPU=1 rehearses on CPU)")]
pytest.importorskip("deepspeed", reason="needs deepspeed (make gpu-wheels carries it to a bare GPU machine)")

CASES = [(stage, precision, "plain") for precision in ("bf16", "fp32") for stage in (0, 1, 2, 3)]
CASES += [(2, "bf16", "offload"), (1, "fp32", "offload")]
if ON_CPU:  # bf16 on a CPU without native support is emulated (slow) and not what is checked
    CASES = [c for c in CASES if c[1] == "fp32"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out, results = tmp_path_factory.mktemp("deepspeed"), {}
    for i, (stage, precision, mode) in enumerate(CASES):
        path = out / f"{stage}-{precision}-{mode}.json"
        env = {**os.environ, "MASTER_PORT": str(29517 + i), "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        done = subprocess.run([sys.executable, "-m", "tests.gpu.deepspeed_check", str(stage), precision, mode,
                               str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{stage} {precision} {mode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        results[(stage, precision, mode)] = (json.loads(path.read_text()), torch.load(path.with_suffix(".pt")))
    return results


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_each_configuration_trains_on_the_device(reports, case):
    report, _ = reports[case]
    stage, precision, mode = case
    device = "cpu" if ON_CPU else "cuda"
    assert report["device"].startswith(device)
    assert report["precision"] == precision
    block = report["inside_block"]
    # DeepSpeed casts the module itself (no autocast): a bf16 run computes its blocks in bf16
    assert block == {"input": f"torch.{'bfloat16' if precision == 'bf16' else 'float32'}",
                     "weight": f"torch.{'bfloat16' if precision == 'bf16' else 'float32'}", "autocast": False}
    assert report["batch_devices"] == [report["device"]]  # every batch was placed on the device
    # the EMA follows the fp32 masters: on the device, or in CPU memory with optimizer offload
    assert report["ema_devices"] == (["cpu"] if mode == "offload" else [report["device"]])
    steps = report["steps"]
    assert all(s["clipped"] and not s["skipped"] and s["grad_norm"] > 0.1 for s in steps), steps
    assert report["nan_step"] == {"skipped": True, "ema_unchanged": True}
    assert report["counters"] == [4, 1] and report["reload_counters"] == [4, 1]
    assert report["reload_equal"]
    for s, row in zip(steps, report["rows"]):  # reduced over the group (of one): the step's own loss
        assert row["loss"] == pytest.approx(s["loss"], rel=1e-6)


def test_auto_precision_picks_bf16_on_a_gpu_that_has_it():
    if ON_CPU:
        pytest.skip("a CPU rehearsal: the GPU's capability is what is checked")
    from vdvae_dist.core.precision import resolve

    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve("auto", torch.device("cuda")).bf16 == native
    assert native, f"{torch.cuda.get_device_name()} has no native bf16: the bf16 cases above emulate it"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_stage_and_offload_learn_the_same_weights(reports, precision):
    """Same start, batches and noise: the stages differ only in how the state is split,
    so their losses and final EMA weights agree (bf16 to its rounding)."""
    cases = [c for c in CASES if c[1] == precision]
    if not cases:
        pytest.skip(f"no {precision} case on this device")
    (first_report, first_ema), rel = reports[cases[0]], (1e-4 if precision == "fp32" else 2e-2)
    for case in cases[1:]:
        report, ema = reports[case]
        for a, b in zip(first_report["steps"], report["steps"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel), case
        moved = max((first_ema[k] - ema[k]).abs().max().item() for k in ema)
        assert moved < (1e-5 if precision == "fp32" else 1e-2), (case, moved)
