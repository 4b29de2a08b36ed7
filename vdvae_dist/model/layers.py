"""Convolutional building blocks shared by the Efficient and the original VDVAE designs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def activation(design: str) -> nn.Module:
    # Efficient-VDVAE uses SiLU; VDVAE uses GELU
    return nn.SiLU() if design == "efficient" else nn.GELU()


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
        pad = kernel // 2
        self.residual = residual
        self.net = nn.Sequential(
            activation(design), nn.Conv2d(in_ch, mid_ch, 1),
            activation(design), nn.Conv2d(mid_ch, mid_ch, kernel, padding=pad),
            activation(design), nn.Conv2d(mid_ch, mid_ch, kernel, padding=pad),
            activation(design), nn.Conv2d(mid_ch, out_ch, 1),
        )
        with torch.no_grad():
            self.net[-1].weight.mul_(last_scale)
            if last_scale == 0.0:
                self.net[-1].bias.zero_()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        y = self.net(x_BCHW)
        return x_BCHW + y if self.residual else y


class LearnedPool(nn.Module):
    """Efficient-VDVAE downsampling: strided conv with kernel = stride, LeakyReLU(0.1)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1)


class AvgPool(nn.Module):
    """VDVAE downsampling: parameter-free average pooling (1x1 conv only if widths change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.avg_pool2d(x, self.stride))


class LearnedUnpool(nn.Module):
    """Efficient-VDVAE upsampling: 1x1 conv, LeakyReLU(0.1), nearest upsample, plus a
    learned per-position bias at the output resolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, out_res: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_ch, out_ch, 1)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, out_res, out_res))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(F.leaky_relu(self.conv(x), 0.1), scale_factor=self.stride, mode="nearest")
        return y + self.bias


class NearestUnpool(nn.Module):
    """VDVAE upsampling: parameter-free nearest neighbour (1x1 conv only if widths change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, out_res: int):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.proj(x), scale_factor=self.stride, mode="nearest")


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
