"""Output distributions: discretized mixture of logistics (PixelCNN++ / VDVAE layout)
and Bernoulli. Log-probabilities are in nats, per pixel, computed in fp32.

DMoL parameter layout for M components, `params` of shape (N, 10*M, H, W):
  channels [0, M)                 mixture logits
  then, for colour c in (R, G, B), a block of 3M channels:
      [0, M) means, [M, 2M) raw scales, [2M, 3M) raw coupling coefficients (tanh)
  mean_G += a * x_R, mean_B += b * x_R + g * x_G with a, b, g from the R, G, B blocks.
The lowest and highest bins are open to -inf / +inf.

Pixel grid (both official codes): a pixel u reduced to b bits is
(floor(u / 2^(8-b)) * 2^(8-b) - 127.5) / 127.5, and each bin has half-width 1 / (2^b - 1).
For b = 8 that is the usual normalised distribution over 256 levels; for b < 8 the grid
step (2^(8-b) / 127.5) is a little narrower than the bins, so, as in the official codes,
the probabilities over the grid sum to slightly more than one (the papers' 5-bit NLLs
are computed this way). Edge bins: Efficient-VDVAE opens the top grid value (248 at 5
bits); VDVAE opens only values above 0.999, so its 5-bit top value is an interior bin.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .latent import Noise, rand

LN2 = math.log(2.0)
_LOW_EDGE = -0.999  # below: the lowest bin (the grid's -1 at every bit depth)
VDVAE_HIGH_EDGE = 0.999  # VDVAE's highest bin: values above this
_MIN_SCALE = 1e-7  # guards the division against underflow where the official floor is 0


def grid_step(num_bits: int) -> float:
    return 2 ** (8 - num_bits) / 127.5


def grid_top(num_bits: int) -> float:
    """The highest value of the `num_bits` grid (1.0 at 8 bits, 0.94509804 at 5)."""
    return ((2**num_bits - 1) * 2 ** (8 - num_bits) - 127.5) / 127.5


def top_bin_edge(num_bits: int) -> float:
    """Efficient-VDVAE's highest bin: the top grid value (halfway to the one below)."""
    return grid_top(num_bits) - grid_step(num_bits) / 2


def dmol_scales(raw: torch.Tensor, scale: str, softplus_beta: float = LN2,
                min_log_scale: float | None = None) -> torch.Tensor:
    if scale == "softplus":
        # Efficient-VDVAE: softplus with beta = ln 2 ("gradient smoothing"), floored at
        # exp(min_mol_logscale)
        floor = max(math.exp(-250.0 if min_log_scale is None else min_log_scale), _MIN_SCALE)
        return F.softplus(raw, beta=softplus_beta).clamp_min(floor)
    if scale == "exp":
        return torch.exp(raw.clamp_min(-7.0 if min_log_scale is None else min_log_scale))  # VDVAE
    raise ValueError(f"scale={scale!r} is unknown; allowed: softplus | exp")


def _unpack(params_NPHW: torch.Tensor):
    n, p, h, w = params_NPHW.shape
    if p % 10 != 0:
        raise ValueError(f"params has {p} channels; a DMoL needs 10 * mixtures channels")
    m = p // 10
    logits_NMHW = params_NPHW[:, :m]
    blocks_N3KHW = params_NPHW[:, m:].reshape(n, 3, 3 * m, h, w)
    means_N3MHW = blocks_N3KHW[:, :, :m]
    raw_scales_N3MHW = blocks_N3KHW[:, :, m : 2 * m]
    coeffs_N3MHW = torch.tanh(blocks_N3KHW[:, :, 2 * m :])
    return logits_NMHW, means_N3MHW, raw_scales_N3MHW, coeffs_N3MHW


def _coupled_means(means_N3MHW, coeffs_N3MHW, x_N3HW):
    a, b, g = coeffs_N3MHW[:, 0], coeffs_N3MHW[:, 1], coeffs_N3MHW[:, 2]  # each N,M,H,W
    x_r, x_g = x_N3HW[:, 0:1], x_N3HW[:, 1:2]
    mean_r = means_N3MHW[:, 0]
    mean_g = means_N3MHW[:, 1] + a * x_r
    mean_b = means_N3MHW[:, 2] + b * x_r + g * x_g
    return torch.stack([mean_r, mean_g, mean_b], dim=1)


def dmol_channel_log_probs(
    params: torch.Tensor,
    x: torch.Tensor,
    *,
    num_bits: int = 8,
    scale: str = "softplus",
    softplus_beta: float = LN2,
    min_log_scale: float | None = None,
    high_edge: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per component: log p(R), log p(G | R), log p(B | R, G), shape (N, 3, M, H, W),
    and the mixture log-weights (N, M, H, W)."""
    params = params.float()
    x_N3HW = x.float()
    logits_NMHW, means, raw_scales, coeffs = _unpack(params)
    mu_N3MHW = _coupled_means(means, coeffs, x_N3HW)
    s_N3MHW = dmol_scales(raw_scales, scale, softplus_beta, min_log_scale)
    high_edge = top_bin_edge(num_bits) if high_edge is None else high_edge
    half_bin = 1.0 / (2**num_bits - 1)

    x_N31HW = x_N3HW.unsqueeze(2)
    centered = x_N31HW - mu_N3MHW
    inv_s = 1.0 / s_N3MHW
    plus_in = inv_s * (centered + half_bin)
    min_in = inv_s * (centered - half_bin)
    mid_in = inv_s * centered
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid, lowest bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # highest bin
    # sigmoid(plus) - sigmoid(min), evaluated on the side that avoids cancellation near 1
    cdf_delta = torch.where(
        mid_in > 0,
        torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
        torch.sigmoid(plus_in) - torch.sigmoid(min_in),
    )
    # very sharp components: density at the centre times the bin width
    log_pdf_mid = mid_in - torch.log(s_N3MHW) - 2.0 * F.softplus(mid_in) + math.log(2 * half_bin)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid)
    log_p = torch.where(
        x_N31HW < _LOW_EDGE, log_cdf_plus, torch.where(x_N31HW > high_edge, log_one_minus_cdf_min, log_mid)
    )
    return log_p, torch.log_softmax(logits_NMHW, dim=1)


def dmol_log_prob(params: torch.Tensor, x: torch.Tensor, **settings) -> torch.Tensor:
    """Joint log-probability (nats) of each RGB pixel, shape (N, H, W).

    params: (N, 10*M, H, W); x: (N, 3, H, W) in [-1, 1] on the `num_bits` grid.
    `settings`: the keywords of dmol_channel_log_probs (num_bits, scale, softplus_beta,
    min_log_scale, high_edge: values above it fall in the open top bin, by default
    Efficient-VDVAE's).
    """
    log_p_N3MHW, log_w_NMHW = dmol_channel_log_probs(params, x, **settings)
    return torch.logsumexp(log_p_N3MHW.sum(dim=1) + log_w_NMHW, dim=1)


def quantize(y: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Nearest point of the `num_bits` grid (bin edges are midpoints)."""
    step = 2 ** (8 - num_bits)
    k = torch.round((y * 127.5 + 127.5) / step).clamp(0, 2**num_bits - 1)
    return (k * step - 127.5) / 127.5


def dmol_sample(
    params: torch.Tensor,
    *,
    num_bits: int = 8,
    scale: str = "softplus",
    softplus_beta: float = LN2,
    min_log_scale: float | None = None,
    temperature: float = 1.0,
    generator: Noise = None,
) -> torch.Tensor:
    """Exact samples of the DMoL, (N, 3, H, W) in [-1, 1] on the `num_bits` grid.

    Colours are drawn in order R, G, B so the coupling uses the sampled (quantized) values,
    exactly as `dmol_log_prob` conditions on them.
    """
    params = params.float()
    logits_NMHW, means, raw_scales, coeffs = _unpack(params)
    m = logits_NMHW.shape[1]
    u = rand(logits_NMHW.shape, generator, params.device).clamp(1e-5, 1 - 1e-5)
    gumbel = -torch.log(-torch.log(u))
    pick_N1MHW = F.one_hot((logits_NMHW + gumbel).argmax(dim=1), m).permute(0, 3, 1, 2).unsqueeze(1).float()

    def select(t_N3MHW: torch.Tensor) -> torch.Tensor:
        return (t_N3MHW * pick_N1MHW).sum(dim=2)  # N,3,H,W

    mean, s = select(means), select(dmol_scales(raw_scales, scale, softplus_beta, min_log_scale))
    coef = select(coeffs)
    u = rand(mean.shape, generator, params.device).clamp(1e-5, 1 - 1e-5)
    noise = (torch.log(u) - torch.log1p(-u)) * (s * temperature)
    x_r = quantize(mean[:, 0] + noise[:, 0], num_bits)
    x_g = quantize(mean[:, 1] + coef[:, 0] * x_r + noise[:, 1], num_bits)
    x_b = quantize(mean[:, 2] + coef[:, 1] * x_r + coef[:, 2] * x_g + noise[:, 2], num_bits)
    return torch.stack([x_r, x_g, x_b], dim=1)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x) in nats per pixel, (N, H, W), for logits (N, 1, H, W) and x in {0, 1}."""
    nll = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    return -nll.sum(dim=1)


def bernoulli_sample(logits: torch.Tensor, *, generator: Noise = None) -> torch.Tensor:
    probs = torch.sigmoid(logits.float())
    return (rand(probs.shape, generator, probs.device) < probs).float()
