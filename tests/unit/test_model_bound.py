"""The VDVAE's bound against independent computations: the importance weights of its
evaluation (log p(x | z) + log p(z) - log q(z | x) at the drawn latents, not the analytic
KL), and the discretized logistic likelihood on a 5-bit grid (no official 5-bit reference
value exists in tests/reference*)."""
import math

import pytest
import torch
from torch.distributions import Normal

from vdvae_dist.config import load
from vdvae_dist.model import build_model
from vdvae_dist.model.blocks import TopDownBlock
from vdvae_dist.model.likelihoods import dmol_channel_log_probs


def _latent_records(model):
    """Forward hooks recording, per latent group and pass, the raw prior and posterior
    statistics and the z fed to the decoder."""
    records = []
    z = model.config.latent_channels
    for block in (m for m in model.modules() if isinstance(m, TopDownBlock)):
        rec = {"prior": [], "posterior": [], "z": []}
        records.append(rec)
        if model.config.design == "efficient":  # (mean, raw std) out of the 1x1 projection
            block.prior_proj.register_forward_hook(lambda m, a, out, rec=rec: rec["prior"].append(out.float()))
        else:  # [mean, log std, residual] out of the prior cell
            block.prior.register_forward_hook(lambda m, a, out, rec=rec: rec["prior"].append(out[:, :2 * z].float()))
        block.posterior_proj.register_forward_hook(lambda m, a, out, rec=rec: rec["posterior"].append(out.float()))
        block.z_proj.register_forward_pre_hook(lambda m, a, rec=rec: rec["z"].append(a[0].float()))
    return records


def _normal(raw_B2ZHW, design: str, beta: float) -> Normal:
    mean, raw = raw_B2ZHW.double().chunk(2, dim=1)
    std = torch.nn.functional.softplus(raw, beta=beta) if design == "efficient" else raw.exp()
    return Normal(mean, std)


@pytest.mark.parametrize("design", ["efficient", "original"])
@torch.no_grad()
def test_importance_weights_use_the_sampled_latents_log_ratio(design):
    """log w_k = -recon_k - sum over groups of [log q(z_k) - log p(z_k)], with z_k, q and p
    recorded inside the model and the densities from torch.distributions; recon_k from a
    plain forward pass drawing the same noise. The analytic KL in its place differs by far
    more than the tolerance (checked below)."""
    # two resolutions, two latent groups: every kind of block, few convolutions
    cfg = load("tiny", overrides=[f"model.design={design}", 'model.encoder="32s1,32p4,8s1"',
                                  'model.decoder="8s1,32u4,32s1"'])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    k = 2
    recons, analytic = [], []
    g = torch.Generator().manual_seed(7)
    for _ in range(k):  # the encoder draws nothing: pass k draws what the k-th weight draws
        elbo = model(x, noise=g)
        recons.append(elbo.recon.double())
        analytic.append(elbo.kl.sum(0).double())
    records = _latent_records(model)
    ours = model.importance_log_weights(x, k, noise=torch.Generator().manual_seed(7)).double()  # (N, K)
    beta = cfg.model.latent_softplus_beta
    for i in range(k):
        log_ratio = torch.zeros(len(x), dtype=torch.float64)
        for rec in records:
            q = _normal(rec["posterior"][i], design, beta)
            p = _normal(rec["prior"][i], design, beta)
            zi = rec["z"][i].double()
            log_ratio += (q.log_prob(zi) - p.log_prob(zi)).sum(dim=(1, 2, 3))
        # the model's latent term: its weight less the same reconstruction term (bitwise the
        # same pass, up to float32 rounding of a sum of ~2e4 nats)
        model_ratio = -(ours[:, i] + recons[i])
        torch.testing.assert_close(model_ratio, log_ratio, rtol=1e-4, atol=1e-2)
        assert (log_ratio - analytic[i]).abs().max() > 0.1  # the check has teeth


def _logistic_bin_probs(x, mean, scale, bits: int, top_open: bool) -> torch.Tensor:
    """P(bin of x) of a logistic(mean, scale) in float64, from its CDF: bins of half-width
    1 / (2^bits - 1) around each grid value, the lowest open to -inf, the highest open to
    +inf only when `top_open`."""
    x, mean, scale = x.double(), mean.double(), scale.double()
    half = 1.0 / (2**bits - 1)
    cdf = lambda v: torch.sigmoid((v - mean) / scale)
    upper = torch.where((x >= x.max()) if top_open else (x > 0.999), torch.ones_like(x), cdf(x + half))
    lower = torch.where(x < -0.999, torch.zeros_like(x), cdf(x - half))
    return upper - lower


@pytest.mark.parametrize("design", ["efficient", "original"])
def test_5bit_bin_probabilities_match_the_logistic_cdf(design):
    """One logistic per channel, no colour coupling, at every value of the 5-bit grid:
    Efficient-VDVAE opens the top grid value (248) to +inf; VDVAE opens only values above
    0.999, so its top 5-bit value (0.945) keeps a bin of half-width 1/31 like the others."""
    bits = 5
    grid = (torch.arange(2**bits) * 2 ** (8 - bits) - 127.5) / 127.5
    x = grid.view(1, 1, 1, -1).expand(1, 3, 1, 2**bits)
    g = torch.Generator().manual_seed(0)
    means = torch.rand(1, 3, 1, 1, generator=g) * 1.6 - 0.8
    raw_scales = torch.rand(1, 3, 1, 1, generator=g) - 1.2  # every bin above the tail approximation
    params = torch.zeros(1, 10, 1, 2**bits)  # channel 0: the one mixture logit; per colour [mean, scale, coeff]
    for c in range(3):
        params[:, 1 + 3 * c] = means[:, c]
        params[:, 2 + 3 * c] = raw_scales[:, c]
    if design == "efficient":
        settings = dict(scale="softplus", softplus_beta=math.log(2.0))
        scales = torch.nn.functional.softplus(raw_scales, beta=math.log(2.0))
    else:
        settings = dict(scale="exp", high_edge=0.999)
        scales = raw_scales.exp()
    log_p, _ = dmol_channel_log_probs(params, x, num_bits=bits, **settings)
    ours = log_p[0, :, 0].double().exp()  # (3 colours, 1 row, 32 values)
    theirs = _logistic_bin_probs(x[0], means[0], scales[0], bits, top_open=design == "efficient")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
