"""Parameter counts of the paper presets against the official Efficient-VDVAE counts."""
import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.model import build_model, count_parameters

OFFICIAL = {
    "cifar10": 56_598_692,
    "imagenet32": 145_068_388,
    "imagenet64": 168_367_588,
    "celeba64": 131_402_212,
    "ffhq256": 208_873_444,
    "ffhq256-5bit": 197_677_156,
    "ffhq1024": 75_869_284,
    "mnist": 69_919_585,
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_parameter_count_matches_official(preset):
    with torch.device("meta"):
        n = count_parameters(build_model(load(preset).model))
    assert abs(n - OFFICIAL[preset]) / OFFICIAL[preset] < 0.01, (preset, n, OFFICIAL[preset])


def test_paper_facts_in_presets():
    c = load("cifar10")
    assert (c.model.width, c.model.latent_channels, c.optim.batch_size, c.optim.skip_threshold) == (384, 32, 32, 800)
    f = load("ffhq256-5bit")
    assert (f.model.num_bits, f.optim.clip_norm, f.optim.skip_threshold, f.optim.batch_size) == (5, 20.0, 1000.0, 16)
    assert load("ffhq1024").model.output_softplus_beta == 0.4
    m = load("mnist")
    assert (m.model.likelihood, m.model.pad, m.data.resolution) == ("bernoulli", 2, 28)
    for name in OFFICIAL:
        o = load(name).optim
        assert (o.name, o.lr, o.betas, o.eps, o.warmup_steps, o.ema_decay) == ("adamax", 1e-3, (0.9, 0.999), 1e-8, 100, 0.9999)
