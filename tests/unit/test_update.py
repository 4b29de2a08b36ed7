import copy
import math

import pytest
import torch
import torch.nn as nn

from vdvae_dist.config import load
from vdvae_dist.train.ema import EMA
from vdvae_dist.train.objective import objective
from vdvae_dist.train.schedules import balance_weights, kl_beta, lr_at
from vdvae_dist.train.rule import TrainingDiverged
from vdvae_dist.train.torch_rule import TorchRule
from vdvae_dist.model import Elbo


def _rule(**optim):
    cfg = load("tiny", overrides=[f"optim.{k}={v}" for k, v in optim.items()])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, TorchRule(model, cfg, torch.device("cpu"))


def _backward(model, scale=1.0):
    x = torch.randn(16, 4)
    (model(x).pow(2).mean() * scale).backward()


def _snapshot(model, rule):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(rule.optimizer.state_dict()), copy.deepcopy(rule.ema.state_dict())


def _equal_states(a, b):
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y))
        return x == y
    return eq(a, b)


def test_skips_nan_and_above_threshold_updates_leaving_everything_untouched():
    model, rule = _rule(skip_threshold=1e6, max_consecutive_skips=0)
    _backward(model); rule.apply()  # one real step so optimizer state exists
    before = _snapshot(model, rule)
    _backward(model)
    next(model.parameters()).grad[0, 0] = float("nan")
    out = rule.apply()
    assert out.skipped and math.isnan(out.grad_norm)
    assert _equal_states(before, _snapshot(model, rule))
    _backward(model, scale=1e9)  # finite but above the threshold
    out = rule.apply()
    assert out.skipped and out.grad_norm >= 1e6
    assert _equal_states(before, _snapshot(model, rule))
    assert (rule.skipped, rule.consecutive_skips, rule.step) == (2, 2, 3)
    assert all(p.grad is None for p in model.parameters())
    _backward(model); out = rule.apply()
    assert not out.skipped and rule.consecutive_skips == 0
    assert not _equal_states(before[0], model.state_dict())


def test_threshold_zero_only_skips_non_finite():
    model, rule = _rule(skip_threshold=0.0)
    _backward(model, scale=1e9)
    assert not rule.apply().skipped


def test_stops_after_max_consecutive_skips():
    model, rule = _rule(skip_threshold=1e-12, max_consecutive_skips=3)
    for _ in range(2):
        _backward(model); rule.apply()
    _backward(model)
    with pytest.raises(TrainingDiverged, match="3 consecutive updates skipped"):
        rule.apply()


def test_clipping_limits_the_applied_gradient_but_reports_the_pre_clip_norm():
    model, rule = _rule(clip_norm=0.5, skip_threshold=0.0)
    seen = {}

    def record(opt, args, kwargs):
        seen["norm"] = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))

    rule.optimizer.register_step_pre_hook(record)
    _backward(model, scale=100.0)
    out = rule.apply()
    assert out.grad_norm > 0.5 and abs(seen["norm"] - 0.5) < 1e-4


def test_ema_maths():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    w0 = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, p, old in zip(ema.model.parameters(), model.parameters(), w0):
        assert torch.allclose(e, 0.9 * old + 0.1 * p)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_lr_schedule_warmup_constant_cosine():
    o = load("tiny", overrides=["optim.warmup_steps=10", "optim.decay_start=20", "optim.decay_steps=100",
                                "optim.lr=1e-3", "optim.min_lr=1e-4"]).optim
    assert lr_at(0, o) == pytest.approx(1e-4) and lr_at(9, o) == pytest.approx(1e-3)
    assert lr_at(15, o) == 1e-3
    assert lr_at(70, o) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(120, o) == pytest.approx(1e-4) and lr_at(10_000, o) == pytest.approx(1e-4)


def test_kl_warmup_and_balancing():
    c = load("tiny", overrides=["loss.kl_warmup_start=10", "loss.kl_warmup_steps=100", "loss.kl_beta_min=0.0"]).loss
    assert kl_beta(0, c) == 0.0 and kl_beta(60, c) == pytest.approx(0.5) and kl_beta(200, c) == 1.0
    kl = torch.tensor([1.0, 0.0, 3.0])
    coeff = balance_weights(kl, torch.tensor([1.0, 1.0, 1.0]), 0, c)
    assert coeff.mean().item() == pytest.approx(1.0)
    assert coeff[2] > coeff[0] > coeff[1]  # small-KL groups are pushed less
    elbo = Elbo(nelbo=torch.tensor([14.0]), recon=torch.tensor([10.0]), kl=torch.tensor([[1.0], [3.0]]), dims=2)
    late = load("tiny", overrides=["loss.kl_balance=false", "loss.kl_warmup_steps=0"]).loss
    terms = objective(elbo, 5, late, torch.tensor([1.0, 1.0]))
    assert terms.loss.item() == pytest.approx(7.0) and terms.nelbo.item() == pytest.approx(7.0)


def test_gradient_skip_false_never_skips_even_a_non_finite_norm():
    """Efficient-VDVAE's gradient_skip = False: no skip at all (the step is applied)."""
    model, rule = _rule(gradient_skip="false", skip_threshold=1e-12)
    _backward(model)
    next(model.parameters()).grad[0, 0] = float("nan")
    out = rule.apply()
    assert not out.skipped and math.isnan(out.grad_norm) and rule.skipped == 0
    assert torch.isnan(next(model.parameters())).any()  # applied, as the official code would


def test_ema_rate_as_float32_follows_openai():
    """openai/vdvae makes ema_rate a float32 tensor: 0.9999 weighs new weights by 1 - float32(0.9999)."""
    from vdvae_dist.train.ema import ema_rates

    keep, take = ema_rates(0.9999, as_float32=True)
    assert take == pytest.approx(1.000166e-4, rel=1e-6) and keep + take == 1.0
    assert ema_rates(0.9999, as_float32=False) == (0.9999, 1.0 - 0.9999)
    model = nn.Linear(3, 1)
    ema = EMA(model, 0.9999, as_float32=True)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, old in zip(ema.model.parameters(), before):
        assert torch.allclose(e - old, torch.full_like(e, 1.000166e-4), rtol=1e-3)
