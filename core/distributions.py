"""Base distributions and ``FlowModel``, the density model every app is built around."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.flows.base import Flow, sum_except_batch

__all__ = ["StandardNormal", "DiagonalGaussian", "FlowModel"]

_LOG_2PI = math.log(2 * math.pi)


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _check(z: Tensor, shape: tuple[int, ...], who: str) -> None:
    if tuple(z.shape[1:]) != shape:
        raise ValueError(
            f"{who}: expected samples of shape (batch, {', '.join(map(str, shape))}), got {tuple(z.shape)}"
        )


def _batch_size(n: int | None, context: Tensor | None, who: str) -> int:
    if context is None:
        if n is None:
            raise ValueError(f"{who}.sample: give n or a context")
        return n
    if n is not None and n != context.shape[0]:
        raise ValueError(f"{who}.sample: n={n} but the context has batch size {context.shape[0]}")
    return context.shape[0]


class StandardNormal(nn.Module):
    """N(0, I) over tensors of ``shape`` (without the batch dimension); ignores the context."""

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = _shape(shape)
        self.register_buffer("_anchor", torch.zeros(()))  # follows .to(device, dtype)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        _check(z, self.shape, "StandardNormal")
        return sum_except_batch(-0.5 * z * z) - 0.5 * _LOG_2PI * z[0].numel()

    def sample(self, n: int | None = None, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        n = _batch_size(n, context, "StandardNormal")
        return temperature * torch.randn(n, *self.shape, device=self._anchor.device, dtype=self._anchor.dtype)


class DiagonalGaussian(nn.Module):
    """Conditional N(mean(c), diag(exp(log_scale(c))^2)); ``net(c)`` returns (B, 2 * prod(shape)).

    Without a ``net`` the mean and log-scale are free parameters (an unconditional learned Gaussian).
    """

    def __init__(self, shape: int | Sequence[int], net: nn.Module | None = None) -> None:
        super().__init__()
        self.shape = _shape(shape)
        self.net = net
        if net is None:
            self.mean = nn.Parameter(torch.zeros(self.shape))
            self.log_scale = nn.Parameter(torch.zeros(self.shape))

    def params(self, context: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        if self.net is None:
            return self.mean.expand(batch, *self.shape), self.log_scale.expand(batch, *self.shape)
        if context is None:
            raise ValueError("DiagonalGaussian with a network needs a context")
        mean, log_scale = self.net(context).reshape(context.shape[0], 2, *self.shape).unbind(1)
        return mean, log_scale

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        _check(z, self.shape, "DiagonalGaussian")
        mean, log_scale = self.params(context, z.shape[0])
        eps = (z - mean) * torch.exp(-log_scale)
        return sum_except_batch(-0.5 * eps * eps - log_scale) - 0.5 * _LOG_2PI * z[0].numel()

    def sample(self, n: int | None = None, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        n = _batch_size(n, context, "DiagonalGaussian")
        mean, log_scale = self.params(context, n)
        return mean + temperature * log_scale.exp() * torch.randn_like(mean)


class FlowModel(nn.Module):
    """A density ``log p(x | c) = log p_base(f(x, c) | c) + log|det df/dx|`` with ``f = transform``.

    Example:
        >>> from core.flows import AffineCoupling, half_mask
        >>> from core.nn import MLP
        >>> model = FlowModel(AffineCoupling(half_mask(2), MLP(1, 2)), StandardNormal(2))
        >>> model.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, transform: Flow, base: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.base = base

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z, context) + logdet

    def sample(self, n: int | None = None, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples (or one per row of ``context``); ``temperature`` scales the base noise."""
        z = self.base.sample(n, context, temperature)
        return self.transform.inverse(z, context)[0]

    def sample_with_log_prob(
        self, n: int | None = None, context: Tensor | None = None, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Samples and their log-density under the model (at temperature 1, whatever ``temperature`` is)."""
        z = self.base.sample(n, context, temperature)
        x, logdet = self.transform.inverse(z, context)
        return x, self.base.log_prob(z, context) - logdet
