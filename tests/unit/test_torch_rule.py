"""The single-process update rule's checkpoint: everything needed to resume comes back (the
EMA included), and a checkpoint cannot run code when it is read."""
import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.model import build_model
from vdvae_dist.train.objective import group_sizes
from vdvae_dist.train.step import train_step
from vdvae_dist.train.torch_rule import TorchRule


def _rule(seed: int) -> TorchRule:
    # decay 0.9: the EMA moves visibly in a few steps (and differs from the raw weights)
    cfg = load("tiny", overrides=["optim.batch_size=2", "optim.ema_decay=0.9", "optim.warmup_steps=1",
                                  "engine.precision=fp32", "engine.device=cpu", "optim.skip_threshold=0"])
    torch.manual_seed(seed)
    return TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))


def _batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(n)]


def _step(rule: TorchRule, batch) -> None:
    train_step(rule, batch, rule.cfg.loss, group_sizes(rule.module), seed=0)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_rule_has_the_saved_weights_optimizer_ema_and_counters(tmp_path):
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels for the comparison
    batches = _batches(3)
    rule = _rule(0)
    for batch in batches[:2]:
        _step(rule, batch)
    rule.save(tmp_path, {"note": "kept"})
    resumed = _rule(1)  # other initial weights: the checkpoint must replace all of them
    assert resumed.load(tmp_path) == {"note": "kept"}
    assert (resumed.step, resumed.skipped) == (rule.step, rule.skipped) == (2, 0)
    assert _equal(resumed.module.state_dict(), rule.module.state_dict())
    assert _equal(resumed.ema.state_dict(), rule.ema.state_dict())
    assert not _equal(rule.ema.state_dict(), rule.module.state_dict())  # the EMA is its own state
    saved_state = rule.optimizer.state_dict()["state"]
    for i, state in resumed.optimizer.state_dict()["state"].items():
        assert _equal(state, saved_state[i])
    for r in (rule, resumed):  # and both go on identically
        _step(r, batches[2])
    assert _equal(resumed.module.state_dict(), rule.module.state_dict())
    assert _equal(resumed.ema_weights(), rule.ema_weights())


class _Payload:
    """What an attacker with write access to the checkpoint bucket would plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def test_a_crafted_pickle_in_the_state_file_is_refused_without_running(tmp_path):
    rule = _rule(0)
    rule.save(tmp_path, {})
    marker = tmp_path / "code-ran"
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    torch.save({**state, "client": {"payload": _Payload(str(marker))}}, tmp_path / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        _rule(1).load(tmp_path)
    assert not marker.exists()
