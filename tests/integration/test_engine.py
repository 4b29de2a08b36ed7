"""DeepSpeed ZeRO 0-3 on 1 and 2 CPU ranks (gloo): gradient skipping, clipping, EMA,
checkpoints, equality with the single-process torch rule.

A spawn (process start, DeepSpeed import, gloo rendezvous) costs far more than a check, so
three spawns run them all (tests/integration/ds_worker.py's `family`): one rank, two ranks,
one rank again, so that checkpoints cross world sizes both ways; the tests below read what
they recorded. The offload test has a fourth spawn of its own."""
import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.integration.ds_worker import COMPARED_SCALES, family, offloaded
from vdvae_dist.config import load
from vdvae_dist.model import build_model

# the spawns a test waits for take minutes on a loaded 2-core machine
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
WORLDS = {"one-a": 1, "two": 2, "one-b": 1}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The folder the spawns share, with the weights train.init_from is given."""
    from vdvae_dist.artifacts.weights import save_export

    folder = tmp_path_factory.mktemp("engine")
    cfg = load("tiny")
    torch.manual_seed(123)  # not the run's seed: weights the run could not have drawn itself
    save_export(folder / "given.pt", cfg, build_model(cfg.model).state_dict(), 0)
    return folder


def _spawn(out, phase: str) -> list[dict]:
    """Run one family spawn; the log of each of its ranks."""
    world = WORLDS[phase]
    mp.spawn(family, args=(world, free_port(), str(out), phase, str(out / "given.pt")), nprocs=world)
    return [json.loads((out / f"{phase}-{r}.json").read_text()) for r in range(world)]


# one fixture per spawn, each after the one whose checkpoints it resumes: a test waits only
# for the spawns it reads
@pytest.fixture(scope="module")
def one_a(out):
    return _spawn(out, "one-a")


@pytest.fixture(scope="module")
def two(out, one_a):
    return _spawn(out, "two")


@pytest.fixture(scope="module")
def one_b(out, two):
    return _spawn(out, "one-b")


@pytest.mark.slow
@pytest.mark.parametrize("stage,bf16", [(0, False), (0, True), (1, True), (2, True), (3, True)])
def test_skips_nan_and_above_threshold_identically_on_every_rank(two, stage, bf16):
    logs = [log[f"skip-{stage}-{bf16}"] for log in two]
    for log in logs:
        assert log["skipped"] == [False, True, True, False]
        assert log["unchanged"] == [True, True]  # weights, optimizer state and EMA untouched
        assert log["ema_lerp"] is True and log["ema_moved"] is True  # ema <- 0.9 ema + 0.1 w
        assert log["counters"] == [4, 2, 2]
        assert log["restored"] == [True] * 5
        assert log["norms"][1] in ("nan", float("inf"))  # non-finite (stage 3 reports inf)
        assert 1000 <= log["norms"][2] < float("inf")  # the true pre-clip norm, above the threshold
        assert log["export_written"] is True
    assert logs[0]["norms"] == logs[1]["norms"]  # one global norm, one decision


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_same_global_batch_gives_the_same_losses_on_one_and_two_workers(one_a, two, stage):
    one, two = one_a[0][f"global_batch-{stage}"], two[0][f"global_batch-{stage}"]
    assert (one["accumulation"], two["accumulation"]) == (2, 1)
    # identical first loss (same weights, data and noise); later ones differ only by float
    # summation order of the gradient (accumulated vs all-reduced)
    assert one["loss"][0] == pytest.approx(two["loss"][0], rel=1e-6)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    assert len(set(one["loss"])) == 3  # the updates did change the model


@pytest.mark.slow
@pytest.mark.parametrize("stage,saved,resumed", [(0, 2, 1), (2, 2, 1), (1, 1, 2), (3, 2, 1)])
def test_resume_on_another_number_of_workers(request, stage, saved, resumed):
    logs = request.getfixturevalue("two" if resumed == 2 else "one_b")
    results = [log[f"resumed-{stage}"] for log in logs]
    assert len(results) == resumed
    for result in results:
        if stage == 3:  # DeepSpeed cannot re-partition ZeRO-3 state: refused, naming both sizes
            assert f"written by {saved} workers and this run has {resumed}" in result["error"]
            assert f"scaling.workers={saved}" in result["error"]
        else:  # elastic checkpoint: weights, optimizer state and EMA re-partitioned exactly
            assert result == {"step": 2, "weights": True, "exp_avg": True, "ema": True, "next_step_applied": True}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_step_that_bypasses_the_norm_hook_fails_loudly(one_a, stage):
    error = one_a[0][f"bypassed-{stage}"]["error"]
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


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("target", ["optimizer", "ema_shard"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running(one_a, stage, target):
    """DeepSpeed's own files (read through our weights-only reader) and our EMA shard."""
    result = one_a[0][f"crafted-{stage}"][target]
    assert result["code_ran"] is False
    assert result["error"] and "Weights only load failed" in result["error"]


@pytest.mark.slow
def test_a_crafted_pickle_in_the_ema_export_is_refused_on_a_resume_with_another_world_size(one_b):
    result = one_b[0]["crafted-export"]
    assert result["code_ran"] is False
    assert result["error"] and "Weights only load failed" in result["error"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,bf16", [(0, False), (0, True), (2, True), (3, True)])
def test_init_from_starts_raw_and_ema_weights_on_every_rank(two, stage, bf16):
    """train.init_from through the DeepSpeed rule: stage 3 partitions what it is given, and with
    bf16 the fp32 masters (and so the EMA) hold the given weights exactly, not their bf16 rounding."""
    for log in two:
        assert log[f"init-{stage}-{bf16}"] == {"raw": True, "ema": True, "step": 0}


def _relative_gap(state: dict, reference: dict, start: dict) -> float:
    """||state - reference|| / ||reference - start|| over all parameters: the disagreement
    relative to how far training moved them."""
    flat = lambda d: torch.cat([d[k].double().flatten() for k in sorted(start)])
    return float((flat(state) - flat(reference)).norm() / (flat(reference) - flat(start)).norm())


@pytest.mark.slow
def test_zero_stages_train_like_each_other_and_like_the_torch_rule(out, two):
    """Stages 0-3 on 2 ranks (fp32, clipping that binds on every applied step, the third step
    skipped above the threshold, EMA decay 0.9) and the single-process torch rule on the whole
    batches (accumulating the two micro-batches the ranks take): the same losses, pre-clip
    norms, decisions, weights and EMA.

    The runs differ only in float summation order (all-reduce vs accumulation, partitioned vs
    whole norms, contiguous vs channels-last convolutions): losses and norms agree to ~1e-7.
    Adamax divides by the gradient's running max, which turns that rounding into up to ~1e-4 of
    an update for parameters with tiny gradients, so weights and EMA are compared by their
    distance relative to how far 4 updates moved them: measured 1e-6 between stages and 1.2e-4
    against the torch rule; without clipping it is 0.14, with the EMA rates swapped far more."""
    compared = two[0]["compared"]
    torch_rule = compared["torch"]
    n = len(COMPARED_SCALES)
    assert torch_rule["skipped"] == [False, False, True, False, False]
    assert torch_rule["clipped"] == [True, True, True, True, True]  # the clip binds on every step
    torch.manual_seed(0)  # the initial weights of every run
    start = {k: v.detach() for k, v in build_model(load("tiny").model).named_parameters()}
    reference = torch.load(out / "compared-torch.pt", weights_only=True)
    stage0 = torch.load(out / "compared-stage0.pt", weights_only=True)
    for stage in (0, 1, 2, 3):
        log = compared[f"stage{stage}"]
        assert log["skipped"] == torch_rule["skipped"], stage
        assert log["loss"] == pytest.approx(torch_rule["loss"], rel=1e-5), stage
        assert log["grad_norm"] == pytest.approx(torch_rule["grad_norm"], rel=1e-5), stage
        assert len(log["loss"]) == n and len(set(log["loss"])) == n
        state = torch.load(out / f"compared-stage{stage}.pt", weights_only=True)
        for what in ("weights", "ema"):
            assert _relative_gap(state[what], stage0[what], start) < 1e-4, (stage, what)
            assert _relative_gap(state[what], reference[what], start) < 1e-3, (stage, what)


@pytest.mark.slow
def test_offload_trains_with_the_projects_optimizer_exactly_as_without(tmp_path):
    """DeepSpeed refuses a client optimizer with offload unless told not to force its CPU Adam
    (0.19.8 raises at start); with that, the offloaded run gives the same losses, norms, skip
    and weights as the one without, on 2 CPU ranks (stage 1, which shares stage 2's optimizer
    class and offload path, and stage 3 with parameters offloaded too)."""
    mp.spawn(offloaded, args=(2, free_port(), str(tmp_path)), nprocs=2)
    log = json.loads((tmp_path / "offload.json").read_text())
    for stage in (1, 3):
        plain, off = log[f"{stage}-plain"], log[f"{stage}-offload"]
        assert off["config"]["offload_optimizer"]["device"] == "cpu"
        assert off["config"].get("offload_param", {}).get("device") == ("cpu" if stage == 3 else None)
        assert off["skipped"] == plain["skipped"] == [False, True, False]
        assert off["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert off["grad_norm"][0] == pytest.approx(plain["grad_norm"][0], rel=1e-5) and off["grad_norm"][0] > 0.1
        assert off["weights"] == pytest.approx(plain["weights"], rel=1e-4, abs=1e-5)
        assert off["ema"] == pytest.approx(plain["ema"], rel=1e-4, abs=1e-5)
        # DeepSpeed's zero_to_fp32.py, which it copies beside every checkpoint, consolidates the
        # (offloaded, partitioned) checkpoint in the project's environment: keys are the model's
        checkpoint = tmp_path / f"checkpoint-{stage}"
        done = subprocess.run([sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint),
                               str(tmp_path / f"fp32-{stage}")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        consolidated = torch.load(next((tmp_path / f"fp32-{stage}").glob("*.bin")), weights_only=True)
        assert set(consolidated) == set(build_model(load("tiny").model).state_dict())
        assert {k: v.sum().item() for k, v in consolidated.items() if k in off["weights"]} == pytest.approx(
            off["weights"], rel=1e-5, abs=1e-6)
