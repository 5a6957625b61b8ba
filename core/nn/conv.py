"""Convolutional conditioners for images and feature maps (B, C, H, W)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.nn.mlp import activation

__all__ = ["ConvNet"]


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(min(8, channels), channels),
            activation(act),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(min(8, channels), channels),
            activation(act),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvNet(nn.Module):
    """3x3 conv in, ``blocks`` residual blocks, 3x3 conv out (zero-initialised by default, as Glow).

    ``context`` is either a vector (B, context_channels), broadcast over the image, or a feature map
    (B, context_channels, H, W); either way it is concatenated to the input channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        blocks: int = 2,
        context_channels: int = 0,
        act: str = "relu",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.context_channels = context_channels
        self.head = nn.Conv2d(in_channels + context_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResidualBlock(hidden, act) for _ in range(blocks)])
        self.tail = nn.Sequential(activation(act), nn.Conv2d(hidden, out_channels, 3, padding=1))
        if zero_init:
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_channels:
            if context is None:
                raise ValueError(f"ConvNet was built with context_channels={self.context_channels} but got none")
            if context.dim() == 2:
                context = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, context], dim=1)
        return self.tail(self.blocks(self.head(x)))
