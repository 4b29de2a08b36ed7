"""Batches reach the network on its parameters' device and memory format: DeepSpeed moves
models, never inputs, so a missed move would only fail on a GPU. The loop installs a
check that fails on CPU too (a meta-device model, or channels_last parameters)."""
import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.model import build_model
from vdvae_dist.train.objective import group_sizes
from vdvae_dist.core.placement import check_placement, memory_format_of, place
from vdvae_dist.train.step import train_step
from vdvae_dist.train.torch_rule import TorchRule


def _batch(n=2):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)


def test_a_batch_on_another_device_than_the_parameters_is_refused():
    with torch.device("meta"):
        model = build_model(load("tiny").model)
    check_placement(model, torch.device("meta"), torch.contiguous_format)
    with pytest.raises(RuntimeError, match="reached the network on cpu"):
        model(_batch())
    placed = place(_batch(), torch.device("meta"), torch.contiguous_format)
    assert placed.device.type == "meta"
    model(placed)  # shapes only, but past the check


def test_the_step_places_batches_in_the_rules_memory_format():
    cfg = load("tiny", overrides=["optim.batch_size=2", "engine.precision=fp32"])
    rule = TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))
    assert rule.memory_format == memory_format_of(rule.module) == torch.channels_last
    check_placement(rule.module, rule.device, rule.memory_format)
    with pytest.raises(RuntimeError, match="channels_last"):
        rule.forward(_batch())  # a plain contiguous batch, not passed through place()
    terms, outcome = train_step(rule, _batch(), cfg.loss, group_sizes(rule.module), seed=0)
    assert torch.isfinite(terms.loss) and not outcome.skipped and rule.step == 1
