"""Unit conversions and generic sample statistics shared by the apps."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["nats_to_bits_per_dim", "bits_per_dim_to_nats", "discrete_bits_per_dim", "mean_and_stderr"]

LN2 = math.log(2.0)


def nats_to_bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Negative log-likelihood per sample in nats -> bits per dimension: ``nll / (D ln 2)``."""
    return nll_nats / (num_dims * LN2)


def bits_per_dim_to_nats(bpd: Tensor | float, num_dims: int) -> Tensor | float:
    """Inverse of :func:`nats_to_bits_per_dim`."""
    return bpd * num_dims * LN2


def discrete_bits_per_dim(nll_nats_scaled: Tensor | float, num_dims: int, scale: float) -> Tensor | float:
    """Bits per dimension of discrete data modelled as continuous data divided by ``scale`` (e.g. 256).

    A model of ``y = x / scale`` has density ``p_x = p_y / scale^D``, so ``-log p_x = -log p_y + D log scale``.
    """
    return (nll_nats_scaled + num_dims * math.log(scale)) / (num_dims * LN2)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor of per-sample values."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_and_stderr of an empty tensor")
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), std / math.sqrt(n)
