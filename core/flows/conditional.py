"""Context-only conditional flows: element-wise maps whose parameters come from the context alone.

GraphAF stacks :class:`ConditionalAffine` on the dequantized node and edge one-hots of each generation step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.flows.affine import affine_forward, affine_inverse, bound_log_scale, check_scale_bound
from core.flows.base import Flow, sum_except_batch
from core.nn import MLP

__all__ = ["ConditionalAffine", "StackedConditionalAffine"]


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


class StackedConditionalAffine:
    """A stack of :class:`ConditionalAffine` layers that all read the same context, evaluated together for sampling.

    The K conditioners run as one batched MLP (the first layer one matrix product over all K, the others batched), so
    ``params(context)`` gives every layer's ``(shift, log_scale)`` (B, K, features) at once and :meth:`inverse` is
    element-wise work only: redrawing the noise for a fixed context (GraphAF's valency check) costs no network call.
    Same values as calling the layers one by one; the weights are stacked when this is built (no autograd: build
    it again after the layers change).
    """

    def __init__(self, layers: Sequence[ConditionalAffine]) -> None:
        first = layers[0]
        if any(
            (l.features, l.scale, l.bound, len(l.net.net))
            != (first.features, first.scale, first.bound, len(first.net.net))
            for l in layers
        ):
            raise ValueError("StackedConditionalAffine: the layers differ in size, scale or depth")
        mods = [list(l.net.net) for l in layers]
        self.scale, self.bound, self.k = first.scale, first.bound, len(layers)
        self.acts = [m for m in mods[0] if not isinstance(m, nn.Linear)]
        depth = [i for i, m in enumerate(mods[0]) if isinstance(m, nn.Linear)]
        with torch.no_grad():
            self.weights = [torch.stack([ms[i].weight for ms in mods]) for i in depth]  # (K, out, in)
            self.biases = [torch.stack([ms[i].bias for ms in mods]) for i in depth]  # (K, out)

    def params(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(shift, log_scale), each (B, K, features), of every layer for ``context`` (B, context_features)."""
        b = context.shape[0]
        h = None
        for i, (w, bias) in enumerate(zip(self.weights, self.biases)):
            if i == 0:  # one product for all K: (B, C) @ (C, K * out)
                h = torch.addmm(bias.reshape(-1), context, w.reshape(-1, w.shape[-1]).t()).view(b, self.k, -1)
            else:  # (K, B, in) @ (K, in, out)
                h = torch.baddbmm(bias.unsqueeze(1), h.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)
            if i < len(self.acts):
                h = self.acts[i](h)
        shift, raw = h.chunk(2, dim=-1)
        return shift, bound_log_scale(raw, self.scale, self.bound)

    def inverse(self, z: Tensor, shift: Tensor, log_scale: Tensor) -> Tensor:
        """``x`` (B, features) from ``z`` through the layers in reverse (the stack's ``inverse``), given ``params``."""
        for k in reversed(range(self.k)):
            z = affine_inverse(z, shift[:, k], log_scale[:, k])[0]
        return z
