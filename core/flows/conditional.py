"""Context-only conditional flows: element-wise maps whose parameters come from the context alone.

GraphAF stacks :class:`ConditionalAffine` on the dequantized node and edge one-hots of each generation step.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from core.flows.affine import affine_forward, affine_inverse, bound_log_scale, check_scale_bound
from core.flows.base import Flow, sum_except_batch
from core.nn import MLP

__all__ = ["ConditionalAffine"]


class ConditionalAffine(Flow):
    """``z = x * exp(s(c)) + t(c)`` element-wise, with ``(t, s_raw) = net(c)`` and ``s`` bounded (tanh by default).

    GraphAF's flow layer (Shi et al. 2020, eq. 5): every layer is conditioned on the R-GCN embedding of the partial
    graph. ``forward`` (density) and ``inverse`` (sampling) cost the same, one network call each.

    Arguments:
        features: size of ``x`` (B, features).
        context_features: size of ``c`` (B, context_features).
        hidden: hidden sizes of the MLP conditioner; its last layer starts at zero (the layer starts as identity).
        bound: the tanh constant, ``|s| < bound``.
        scale: the log-scale bound of :func:`core.flows.affine.bound_log_scale` (``tanh``, ``sigmoid``, ``none``).

    Example:
        >>> import torch
        >>> f = ConditionalAffine(4, 8)
        >>> z, logdet = f(torch.rand(3, 4), torch.randn(3, 8))
    """

    def __init__(
        self,
        features: int,
        context_features: int,
        hidden: Sequence[int] = (128,),
        act: str = "relu",
        bound: float = 3.0,
        scale: str = "tanh",
    ) -> None:
        super().__init__()
        self.features, self.bound, self.scale = features, bound, check_scale_bound(scale, bound)
        self.net = MLP(context_features, 2 * features, tuple(hidden), act=act, zero_init=True)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if context is None:
            raise ValueError("ConditionalAffine needs a context (the graph embedding)")
        shift, raw = self.net(context).chunk(2, dim=-1)
        return shift, bound_log_scale(raw, self.scale, self.bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, log_scale = affine_forward(x, *self._params(context))
        return z, sum_except_batch(log_scale)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, log_scale = affine_inverse(z, *self._params(context))
        return x, sum_except_batch(log_scale)
