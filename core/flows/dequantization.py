"""Dequantization: discrete data (integers in [0, levels)) to continuous data in [0, 1).

``forward`` maps integer-valued ``x`` to ``y = (x + u) / levels`` with noise ``u`` in [0, 1)^D and returns
``logdet = -D log(levels) - log q(u | x)``, so ``log p(y) + logdet`` is a lower bound on the discrete
log-likelihood ``log P(x)`` (Theis et al. 2016; Ho et al. 2019). ``inverse`` quantizes back with ``floor``.

For fixed ``u`` the forward map is the scaling ``x / levels`` (plus a constant), so its Jacobian log-det is
``-D log(levels)``; the ``-log q`` term is the variational part of the bound, zero for uniform noise.

Every dequantization draws base noise ``eps`` (:meth:`draw_noise`, density :meth:`noise_log_prob`) and maps it
deterministically to ``u`` (:meth:`dequantize`); ``forward(x) = dequantize(x, draw_noise(x))``. So
``log q(u|x) = log p(eps) - log|det du/deps|``, which the generic flow suite checks on the autograd Jacobian.

References:
    Ho et al., Flow++ (2019), arXiv:1902.00275.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.flows.base import Flow, sum_except_batch

__all__ = ["UniformDequantization", "VariationalDequantization"]


class _Dequantization(Flow):
    def __init__(self, levels: int = 256) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"dequantization needs at least 2 levels, got {levels}")
        self.levels = levels

    def _scale_logdet(self, x: Tensor) -> Tensor:
        return x.new_full((x.shape[0],), -x[0].numel() * math.log(self.levels))

    def draw_noise(self, x: Tensor) -> Tensor:
        """The base noise ``eps`` for ``x``, shaped like ``x``."""
        raise NotImplementedError

    def noise_log_prob(self, eps: Tensor) -> Tensor:
        """``log p(eps)`` per sample, the density :meth:`draw_noise` draws from."""
        raise NotImplementedError

    def dequantize(self, x: Tensor, eps: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, logdet)`` for integer ``x`` and base noise ``eps``: ``y = (x + u(eps; x)) / levels`` and
        ``logdet = -D log(levels) - log q(u|x)``. Deterministic given ``eps``."""
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.dequantize(x, self.draw_noise(x), context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.floor(z * self.levels).clamp(0, self.levels - 1)
        return x, -self._scale_logdet(z)


class UniformDequantization(_Dequantization):
    """``y = (x + u) / levels`` with ``u ~ U[0, 1)``; ``levels = 2 ** bits`` for n-bit images.

    The noise is drawn in training and evaluation alike, so every reported likelihood is the bound above.
    Inside ``with flow.centered():`` it is the bin centre ``u = 1/2`` instead: a deterministic encoding (for
    reconstruction or conditioning on context frames), whose ``log p`` is NOT a bound on ``log P(x)``.
    """

    def __init__(self, levels: int = 256) -> None:
        super().__init__(levels)
        self.center = False

    @contextmanager
    def centered(self) -> Iterator[UniformDequantization]:
        """Within the block, dequantize to bin centres (deterministic); restores the previous setting."""
        previous, self.center = self.center, True
        try:
            yield self
        finally:
            self.center = previous

    def draw_noise(self, x: Tensor) -> Tensor:
        return torch.full_like(x, 0.5) if self.center else torch.rand_like(x)

    def noise_log_prob(self, eps: Tensor) -> Tensor:
        return eps.new_zeros(eps.shape[0])  # U[0, 1)^D

    def dequantize(self, x: Tensor, eps: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x + eps) / self.levels, self._scale_logdet(x)  # u = eps, log q(u|x) = 0


class VariationalDequantization(_Dequantization):
    """Learned noise ``u = sigmoid(g(eps; x))``, ``eps ~ N(0, I)``, with ``g`` a conditional flow.

    ``noise_flow`` is a :class:`Flow` on tensors shaped like ``x`` whose ``inverse`` maps ``eps`` to the
    pre-sigmoid noise, conditioned on ``context = encoder(x)`` (``encoder`` defaults to centring ``x``).
    ``log q(u|x) = log N(eps) - log|det d g / d eps| - sum log sigmoid'(.)``.

    In evaluation mode the noise is still sampled: the bound is stochastic, average it over draws.
    """

    def __init__(self, noise_flow: Flow, levels: int = 256, encoder: nn.Module | None = None) -> None:
        super().__init__(levels)
        self.noise_flow = noise_flow
        self.encoder = encoder

    def _condition(self, x: Tensor) -> Tensor:
        h = 2 * x / (self.levels - 1) - 1
        return self.encoder(h) if self.encoder is not None else h

    def draw_noise(self, x: Tensor) -> Tensor:
        return torch.randn_like(x)

    def noise_log_prob(self, eps: Tensor) -> Tensor:
        return sum_except_batch(-0.5 * eps * eps - 0.5 * math.log(2 * math.pi))

    def dequantize(self, x: Tensor, eps: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_q = self.noise_log_prob(eps)
        v, logdet_g = self.noise_flow.inverse(eps, self._condition(x))
        u = torch.sigmoid(v)
        log_q = log_q - logdet_g - sum_except_batch(F.logsigmoid(v) + F.logsigmoid(-v))
        return (x + u) / self.levels, self._scale_logdet(x) - log_q
