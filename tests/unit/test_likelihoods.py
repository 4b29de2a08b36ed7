import itertools

import pytest
import torch

from vdvae_dist.model.likelihoods import (bernoulli_log_prob, dmol_channel_log_probs, dmol_log_prob, dmol_sample,
                                          quantize)


def _pixel_params(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(1, 10 * m, 1, 1, generator=g)
    p[:, m:] *= 0.7  # keep scales moderate so many bins carry mass
    return p


def _grid(bits: int) -> torch.Tensor:
    """The official codes' grid: (k * 2^(8-bits) - 127.5) / 127.5."""
    return (torch.arange(2**bits, dtype=torch.float32) * 2 ** (8 - bits) - 127.5) / 127.5


@pytest.mark.parametrize("scale", ["softplus", "exp"])
def test_one_pixel_8bit_joint_sums_to_one(scale):
    """Sum over all 256^3 colours: covers R, G given R, and B given R and G at once."""
    params = _pixel_params(2, 0)
    v = _grid(8)
    total = torch.tensor(0.0, dtype=torch.float64)
    for r in v:  # one R value at a time: G on the H axis, B on the W axis
        x = torch.stack(torch.broadcast_tensors(r.expand(256, 256), v[:, None].expand(256, 256),
                                                 v[None, :].expand(256, 256)))[None]
        lp = dmol_log_prob(params.expand(1, -1, 256, 256), x, num_bits=8, scale=scale)
        total += lp.double().exp().sum()
    assert abs(total.item() - 1.0) < 1e-3


@pytest.mark.parametrize("scale", ["softplus", "exp"])
def test_each_component_sums_to_one_over_r_then_g_given_r_then_b_given_rg(scale):
    params = _pixel_params(3, 3)
    v = _grid(8)
    r0, g0 = v[100], v[30]

    def channel_probs(r, g, b):
        r, g, b = torch.broadcast_tensors(r, g, b)
        x = torch.stack([r, g, b])[None]
        lp, _ = dmol_channel_log_probs(params.expand(1, -1, *r.shape), x, scale=scale)
        return lp[0].double().exp()  # 3, M, H, W

    p_r = channel_probs(v[None, :], g0, v[0])[0].sum(-1)  # sum over 256 R values, per component
    p_g = channel_probs(r0, v[None, :], v[0])[1].sum(-1)  # sum over G given r0
    p_b = channel_probs(r0, g0, v[None, :])[2].sum(-1)  # sum over B given r0, g0
    for p in (p_r, p_g, p_b):
        assert torch.allclose(p, torch.ones_like(p), atol=1e-5), p


def test_5bit_official_convention_overlaps_its_bins():
    """5-bit bins are 2/31 wide on a grid of step 8/127.5, as in both official codes: the
    probabilities sum to a little more than one (about 1.6% per channel, three channels)."""
    params = _pixel_params(3, 1)
    v = _grid(5)
    x = torch.tensor(list(itertools.product(v.tolist(), repeat=3))).T.reshape(1, 3, 32 * 32, 32)
    total = dmol_log_prob(params.expand(1, -1, 32 * 32, 32), x, num_bits=5).double().exp().sum().item()
    assert 1.0 < total < 1.1


def test_sampler_histogram_matches_probabilities():
    """8 bits (where the grid's bins tile the line), two sharp mixtures with coupling: the
    mass lies within a window of 41 levels per channel, enumerated jointly."""
    n = 60_000
    params = torch.zeros(1, 20, 1, 1)
    params[0, :2, 0, 0] = torch.tensor([0.3, -0.2])  # mixture logits
    for c, means in enumerate(([0.02, -0.03], [0.01, 0.04], [-0.02, 0.0])):
        base = 2 + 6 * c
        params[0, base:base + 2, 0, 0] = torch.tensor(means)
        params[0, base + 2:base + 4, 0, 0] = -7.0  # softplus_ln2(-7) = 0.011: about 1.4 levels
        params[0, base + 4:base + 6, 0, 0] = torch.tensor([0.3, -0.2])  # coupling
    v = _grid(8)[108:149]  # levels 108..148, values -0.153..0.161
    combos = torch.tensor(list(itertools.product(v.tolist(), repeat=3)))
    probs = dmol_log_prob(params.expand(1, -1, 1, len(combos)), combos.T.reshape(1, 3, 1, -1)).double().exp().flatten()
    assert probs.sum() > 0.999
    x = dmol_sample(params.expand(n, -1, 1, 1), generator=torch.Generator().manual_seed(0))
    k = (x.flatten(1) * 127.5 + 127.5).round().long() - 108
    inside = ((k >= 0) & (k < 41)).all(dim=1)
    idx = (k[inside] * torch.tensor([41 * 41, 41, 1])).sum(1)
    counts = torch.bincount(idx, minlength=41**3).double()
    expected = probs * n
    keep = expected >= 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum().item()
    df = int(keep.sum()) - 1
    # exact sampling gives ~df (std sqrt(2 df)); a wrong coupling or mixture choice many times df
    assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)


def test_sampler_is_on_the_grid_and_seeded():
    p = torch.randn(2, 30, 4, 4)
    a = dmol_sample(p, num_bits=5, generator=torch.Generator().manual_seed(1))
    b = dmol_sample(p, num_bits=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(quantize(a, 5), a)
    assert a.min() >= -1 and a.max() <= 1


def test_sharp_component_puts_mass_on_its_bin():
    p = torch.zeros(1, 10, 1, 1)
    p[0, 1 + 3 * 0] = 0.2; p[0, 1 + 3 * 1] = 0.2; p[0, 1 + 3 * 2] = 0.2  # means
    p[0, 2] = p[0, 5] = p[0, 8] = -30.0  # scales -> tiny (softplus)
    p[0, 3] = p[0, 6] = p[0, 9] = 0.0  # coefficients -> 0
    x = quantize(torch.full((1, 3, 1, 1), 0.2), 8)
    assert dmol_log_prob(p, x).exp().item() > 0.99


def test_bernoulli_matches_torch_distributions():
    logits = torch.randn(3, 1, 5, 5)
    x = torch.bernoulli(torch.full((3, 1, 5, 5), 0.5))
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(1)
    assert torch.allclose(bernoulli_log_prob(logits, x), ref, atol=1e-6)
