"""Convolutional building blocks of the Efficient (Hazami et al. 2022) and the original
(Child 2021) VDVAE designs, each initialised as its paper's code does."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def activation(design: str) -> nn.Module:
    # Efficient-VDVAE uses SiLU; VDVAE uses GELU
    return nn.SiLU() if design == "efficient" else nn.GELU()


def conv(in_ch: int, out_ch: int, kernel: int, design: str, torch_init: bool = False, stride: int = 1) -> nn.Conv2d:
    """A 'same'-padded convolution. Efficient design: Xavier-uniform weights and zero bias,
    except where its code uses torch's default (`torch_init`: the first 1x1 of a cell);
    original design: torch's default weights and zero bias."""
    c = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=0 if stride > 1 else kernel // 2)
    with torch.no_grad():
        if design == "efficient" and not torch_init:
            nn.init.xavier_uniform_(c.weight)
        if design == "original" or not torch_init:
            c.bias.zero_()
    return c


class ResidualCell(nn.Module):
    """Pre-activation bottleneck: act -> 1x1 -> act -> kxk -> act -> kxk -> act -> 1x1.

    With `residual`, the input is added to the output (then out_ch == in_ch).
    `last_scale` multiplies the last conv's initial weights (sqrt(1/N) for stability;
    0 makes the cell start as the identity / as zero).
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, kernel: int, design: str,
                 residual: bool = True, last_scale: float = 1.0):
        super().__init__()
        assert not residual or in_ch == out_ch
        self.residual = residual
        self.net = nn.Sequential(
            activation(design), conv(in_ch, mid_ch, 1, design, torch_init=True),
            activation(design), conv(mid_ch, mid_ch, kernel, design),
            activation(design), conv(mid_ch, mid_ch, kernel, design),
            activation(design), conv(mid_ch, out_ch, 1, design),
        )
        with torch.no_grad():
            self.net[-1].weight.mul_(last_scale)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        y = self.net(x_BCHW)
        return x_BCHW + y if self.residual else y


class LearnedPool(nn.Module):
    """Efficient-VDVAE downsampling: strided conv with kernel = stride, LeakyReLU(0.1)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = conv(in_ch, out_ch, stride, "efficient", stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1)


class AvgPool(nn.Module):
    """VDVAE downsampling: average pooling; extra channels of a wider resolution start at zero."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        assert out_ch >= in_ch
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(F.avg_pool2d(x, self.stride), [0, 0, 0, 0, 0, self.extra])


class LearnedUnpool(nn.Module):
    """Efficient-VDVAE upsampling: 1x1 conv, LeakyReLU(0.1), nearest upsample, plus a
    learned per-position bias at the output resolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, out_res: int):
        super().__init__()
        self.stride = stride
        self.conv = conv(in_ch, out_ch, 1, "efficient")
        self.bias = nn.Parameter(torch.zeros(1, out_ch, out_res, out_res))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(F.leaky_relu(self.conv(x), 0.1), scale_factor=self.stride, mode="nearest")
        return y + self.bias.to(y.dtype)  # an fp32 bias would promote a bf16 stream


class NearestUnpool(nn.Module):
    """VDVAE upsampling: nearest neighbour of the first `out_ch` channels, added to the
    resolution's learned starting state (zeros above `no_bias_above`)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, out_res: int, learned_bias: bool):
        super().__init__()
        assert in_ch >= out_ch
        self.stride, self.out_ch = stride, out_ch
        self.bias = nn.Parameter(torch.zeros(1, out_ch, out_res, out_res)) if learned_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x[:, : self.out_ch], scale_factor=self.stride, mode="nearest")
        return y if self.bias is None else y + self.bias.to(y.dtype)


class LearnedStart(nn.Module):
    """The learned tensor the top-down pass starts from. A module of its own so that
    frameworks that partition parameters per module (ZeRO-3) gather it when it is used."""

    def __init__(self, channels: int, res: int, design: str):
        super().__init__()
        self.value = nn.Parameter(torch.empty(1, channels, res, res))
        if design == "efficient":
            nn.init.kaiming_uniform_(self.value, nonlinearity="linear")
        else:
            nn.init.zeros_(self.value)

    def forward(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.value.to(dtype).expand(batch, -1, -1, -1)


class OutputAffine(nn.Module):
    """VDVAE's per-channel gain and bias on the last decoder state."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.to(x.dtype) + self.bias.to(x.dtype)
