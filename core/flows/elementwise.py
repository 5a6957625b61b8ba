"""Element-wise and permutation flows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.flows.base import Flow, sum_except_batch

__all__ = ["ElementwiseAffine", "Logit", "Permutation", "RandomPermutation", "Reverse", "ActNorm"]


def _broadcast_channel(p: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel parameter (C,) to broadcast over (B, C, *spatial)."""
    return p.view(1, -1, *([1] * (x.dim() - 2)))


class ElementwiseAffine(Flow):
    """``z = x * exp(log_scale) + shift`` with one learned scale and shift per element of ``shape``."""

    def __init__(self, shape: int | tuple[int, ...]) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.shift = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x * self.log_scale.exp() + self.shift
        return z, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = (z - self.shift) * torch.exp(-self.log_scale)
        return x, -self.log_scale.sum().expand(z.shape[0])


class Logit(Flow):
    """Maps data in (0, 1) to the real line, ``z = logit(alpha + (1 - 2 alpha) x)`` (RealNVP pre-processing).

    ``alpha`` keeps the boundary away from 0 and 1. The inverse is the sigmoid followed by the affine map back.
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit: alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.alpha + (1 - 2 * self.alpha) * x
        z = torch.log(y) - torch.log1p(-y)
        # dz/dx = (1 - 2a) / (y (1 - y))
        logdet = math.log(1 - 2 * self.alpha) - torch.log(y) - torch.log1p(-y)
        return z, sum_except_batch(logdet)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = torch.sigmoid(z)
        x = (y - self.alpha) / (1 - 2 * self.alpha)
        # log dy/dz = log sigmoid(z) + log sigmoid(-z)
        logdet = F.logsigmoid(z) + F.logsigmoid(-z) - math.log(1 - 2 * self.alpha)
        return x, sum_except_batch(logdet)


class Permutation(Flow):
    """A fixed permutation of dimension ``dim`` (features or channels). Its log-det is zero."""

    def __init__(self, permutation: Tensor, dim: int = 1) -> None:
        super().__init__()
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        n = permutation.numel()
        if not torch.equal(torch.sort(permutation).values, torch.arange(n)):
            raise ValueError(f"Permutation: {permutation.tolist()} is not a permutation of 0..{n - 1}")
        if dim == 0:
            raise ValueError("Permutation: dim 0 is the batch dimension")
        self.dim = dim
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _check(self, x: Tensor) -> None:
        if x.shape[self.dim] != self.permutation.numel():
            raise ValueError(
                f"{type(self).__name__}: expected size {self.permutation.numel()} along dim {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        return x.index_select(self.dim, self.permutation), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z)
        return z.index_select(self.dim, self.inverse_permutation), z.new_zeros(z.shape[0])


class RandomPermutation(Permutation):
    """A fixed random permutation of ``features`` (drawn once from ``seed``, stored in the state dict)."""

    def __init__(self, features: int, dim: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        super().__init__(torch.randperm(features, generator=g), dim)


class Reverse(Permutation):
    """Reverses the order of ``features`` along ``dim``."""

    def __init__(self, features: int, dim: int = 1) -> None:
        super().__init__(torch.arange(features - 1, -1, -1), dim)


class ActNorm(Flow):
    """Per-channel affine map ``z = (x - bias) * exp(-log_std)`` (Glow), for (B, C) or (B, C, *spatial).

    Data-dependent initialisation: on the first forward pass in training mode, ``bias`` and ``log_std`` are set
    so that the output has zero mean and unit variance per channel over that batch (over all ranks under
    ``torch.distributed``, weighted by each rank's number of values). The statistics are two-pass and centred,
    accumulated in float64: first the mean, then the mean squared deviation from it (``E[x^2] - mean^2`` in
    float32 cancels for data far from zero, e.g. mean 1000 and std 0.5). The log-det is ``-sum(log_std)`` times
    the number of spatial positions.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_std = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        acc = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        xa = x.detach().to(acc)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        # pass 1: count-weighted mean over every rank (sum and count reduced together)
        count = xa.new_full((1,), x.numel() // x.shape[1])
        sums = torch.cat([xa.sum(dim=dims), count])
        if distributed:
            torch.distributed.all_reduce(sums)
        mean = sums[:-1] / sums[-1]
        # pass 2: the second moment about that global mean
        sq = (xa - _broadcast_channel(mean, xa)).square().sum(dim=dims)
        if distributed:
            torch.distributed.all_reduce(sq)
        std = (sq / sums[-1]).sqrt()
        self.bias.copy_(mean)
        self.log_std.copy_(torch.log(std + self.eps))
        self.initialized.fill_(True)

    def _positions(self, x: Tensor) -> int:
        return x[0, 0].numel()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        z = (x - _broadcast_channel(self.bias, x)) * _broadcast_channel(torch.exp(-self.log_std), x)
        logdet = -self.log_std.sum() * self._positions(x)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z * _broadcast_channel(self.log_std.exp(), z) + _broadcast_channel(self.bias, z)
        logdet = self.log_std.sum() * self._positions(z)
        return x, logdet.expand(z.shape[0])
