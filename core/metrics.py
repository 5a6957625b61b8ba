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


def discrete_bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Bits per dimension of discrete data (integers in ``[0, levels)``) from ``nll_nats = -log P(x)`` per sample.

    The one way to model discrete data here is a dequantization layer first in the flow
    (:class:`core.flows.UniformDequantization` or :class:`core.flows.VariationalDequantization`, ``levels = 2**bits``)
    fed the integer data: its log-det already holds the ``-D log(levels)`` of the scaling ``(x + u) / levels``
    (and ``-log q(u|x)``), so ``-model.log_prob(x)`` is the (bound on the) discrete NLL and no further
    ``D log(levels)`` is added. For 8-bit data under a model uniform on ``[0, 1)^D`` this gives 8 bits/dim.
    Do not scale the data in the pipeline as well: the layer expects integers.
    """
    return nll_nats / (num_dims * LN2)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor of per-sample values."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_and_stderr of an empty tensor")
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), std / math.sqrt(n)
