"""DeepSpeed ZeRO 1/2/3 on 2 CPU ranks (gloo): gradient skipping, EMA, checkpoints."""
import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from vdvae_dist.config import load
from vdvae_dist.model import build_model
from tests.integration.ds_worker import (bypassed_norm_hook, change_world, crafted_pickle, init_from_weights, offloaded,
                                        same_global_batch, skip_and_ema)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage,bf16", [(0, False), (0, True), (1, True), (2, True), (3, True)])
def test_skips_nan_and_above_threshold_identically_on_every_rank(stage, bf16, tmp_path):
    mp.spawn(skip_and_ema, args=(2, stage, bf16, free_port(), str(tmp_path)), nprocs=2)
    logs = [json.loads((tmp_path / f"log-{r}.json").read_text()) for r in range(2)]
    for log in logs:
        assert log["skipped"] == [False, True, True, False]
        assert log["unchanged"] == [True, True]  # weights, optimizer state and EMA untouched
        assert log["ema_lerp"] is True
        assert log["counters"] == [4, 2, 2]
        assert log["restored"] == [True] * 5
        assert log["norms"][1] in ("nan", float("inf"))  # non-finite (stage 3 reports inf)
        assert 1000 <= log["norms"][2] < float("inf")  # the true pre-clip norm, above the threshold
    assert logs[0]["norms"] == logs[1]["norms"]  # one global norm, one decision
    assert (tmp_path / "ema_fp32.pt").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_same_global_batch_gives_the_same_losses_on_one_and_two_workers(stage, tmp_path):
    for world in (1, 2):
        mp.spawn(same_global_batch, args=(world, stage, free_port(), str(tmp_path)), nprocs=world)
    one, two = (json.loads((tmp_path / f"world-{w}.json").read_text()) for w in (1, 2))
    assert (one["accumulation"], two["accumulation"]) == (2, 1)
    # identical first loss (same weights, data and noise); later ones differ only by float
    # summation order of the gradient (accumulated vs all-reduced)
    assert one["loss"][0] == pytest.approx(two["loss"][0], rel=1e-6)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    assert len(set(one["loss"])) == 3  # the updates did change the model


@pytest.mark.parametrize("stage,saved,resumed", [(0, 2, 1), (2, 2, 1), (1, 1, 2), (3, 2, 1)])
def test_resume_on_another_number_of_workers(stage, saved, resumed, tmp_path):
    mp.spawn(change_world, args=(saved, stage, free_port(), str(tmp_path), "save"), nprocs=saved)
    mp.spawn(change_world, args=(resumed, stage, free_port(), str(tmp_path), "load"), nprocs=resumed)
    results = [json.loads((tmp_path / f"resumed-{r}.json").read_text()) for r in range(resumed)]
    for result in results:
        if stage == 3:  # DeepSpeed cannot re-partition ZeRO-3 state: refused, naming both sizes
            assert f"written by {saved} workers and this run has {resumed}" in result["error"]
            assert f"scaling.workers={saved}" in result["error"]
        else:  # elastic checkpoint: weights, optimizer state and EMA re-partitioned exactly
            assert result == {"step": 2, "weights": True, "exp_avg": True, "ema": True, "next_step_applied": True}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_step_that_bypasses_the_norm_hook_fails_loudly(stage, tmp_path):
    mp.spawn(bypassed_norm_hook, args=(1, stage, free_port(), str(tmp_path)), nprocs=1)
    error = json.loads((tmp_path / "bypassed-0.json").read_text())["error"]
    assert error and "without computing the gradient norm through our hook" in error


def test_an_untested_deepspeed_release_is_refused_unless_allowed(monkeypatch):
    import deepspeed

    from vdvae_dist.engine.hooks import TESTED_DEEPSPEED, check_version

    check_version(allow_untested=False)  # the pinned release passes
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with pytest.raises(ValueError, match=f"deepspeed==0.99.0 .* tested with deepspeed=={TESTED_DEEPSPEED}.*"
                                         "engine.allow_untested_deepspeed=true"):
        check_version(allow_untested=False)
    check_version(allow_untested=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running(stage, tmp_path):
    mp.spawn(crafted_pickle, args=(1, stage, free_port(), str(tmp_path)), nprocs=1)
    result = json.loads((tmp_path / "crafted-0.json").read_text())
    assert result["code_ran"] is False
    assert result["error"] and "Weights only load failed" in result["error"]


@pytest.mark.parametrize("stage,bf16", [(0, False), (0, True), (2, True), (3, True)])
def test_init_from_starts_raw_and_ema_weights_on_every_rank(stage, bf16, tmp_path):
    """train.init_from through the DeepSpeed rule: stage 3 partitions what it is given, and with
    bf16 the fp32 masters (and so the EMA) hold the given weights exactly, not their bf16 rounding."""
    import torch

    from vdvae_dist.artifacts.weights import save_export
    from vdvae_dist.config import load
    from vdvae_dist.model import build_model

    cfg = load("tiny")
    torch.manual_seed(123)  # not the run's seed: weights the run could not have drawn itself
    weights = tmp_path / "given.pt"
    save_export(weights, cfg, build_model(cfg.model).state_dict(), 0)
    mp.spawn(init_from_weights, args=(2, stage, bf16, free_port(), str(tmp_path), str(weights)), nprocs=2)
    for r in range(2):
        assert json.loads((tmp_path / f"init-{r}.json").read_text()) == {"raw": True, "ema": True, "step": 0}


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [
    # stages 1 and 2 share DeepSpeed's optimizer class (stage_1_and_2.py) and its offload path
    (1, ["engine.offload_optimizer=true", "engine.deepspeed.zero_optimization.offload_optimizer={pin_memory=false}"]),
    (3, ["engine.offload_params=true", "engine.offload_optimizer=true"]),
])
def test_offload_trains_with_the_projects_optimizer_exactly_as_without(stage, extra, tmp_path):
    """DeepSpeed refuses a client optimizer with offload unless told not to force its CPU Adam
    (0.19.8 raises at start); with that, the offloaded run gives the same losses, norms, skip
    and weights as the one without, on 2 CPU ranks."""
    mp.spawn(offloaded, args=(2, stage, extra, free_port(), str(tmp_path)), nprocs=2)
    log = json.loads((tmp_path / "offload.json").read_text())
    plain, off = log["plain"], log["offload"]
    assert off["config"]["offload_optimizer"]["device"] == "cpu"
    assert off["config"].get("offload_param", {}).get("device") == ("cpu" if stage == 3 else None)
    assert off["skipped"] == plain["skipped"] == [False, True, False]
    assert off["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert off["grad_norm"][0] == pytest.approx(plain["grad_norm"][0], rel=1e-5) and off["grad_norm"][0] > 0.1  # clipped
    assert off["weights"] == pytest.approx(plain["weights"], rel=1e-4, abs=1e-5)
    assert off["ema"] == pytest.approx(plain["ema"], rel=1e-4, abs=1e-5)
    # DeepSpeed's zero_to_fp32.py, which it copies beside every checkpoint, consolidates the
    # (offloaded, partitioned) checkpoint in the project's environment: keys are the model's
    script = tmp_path / "checkpoint" / "zero_to_fp32.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "checkpoint"), str(tmp_path / "fp32")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    consolidated = torch.load(next((tmp_path / "fp32").glob("*.bin")), weights_only=True)
    assert set(consolidated) == set(build_model(load("tiny").model).state_dict())
    assert {k: v.sum().item() for k, v in consolidated.items() if k in off["weights"]} == pytest.approx(
        off["weights"], rel=1e-5, abs=1e-6)
