"""ConcatSquash layers (FFJORD, PointFlow): linear maps gated and shifted by time and context."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.nn.mlp import activation

__all__ = ["ConcatSquashLinear", "ConcatSquashMLP"]


class ConcatSquashLinear(nn.Module):
    """``y = (W x + b) * sigmoid(G c + g) + H c``, with ``c`` the conditioning vector (time and context).

    ``x`` may carry extra middle dimensions, (B, ..., in); ``c`` is (B, context) and is broadcast over them.
    For a point set, (B, N, in), the gate and shift are folded into one weight and bias per set, ``y_b = x_b
    (W * s_b)^T + (b * s_b + h_b)``, a single batched matrix product: it skips two elementwise passes over the
    (B, N, out) output forward and again in every backward (same values to rounding).
    """

    def __init__(self, in_features: int, out_features: int, context_features: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(context_features, out_features)
        self.shift = nn.Linear(context_features, out_features, bias=False)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if x.dim() == 3:
            scale = torch.sigmoid(self.gate(c))  # (B, out)
            weight = self.layer.weight * scale[:, :, None]  # (B, out, in)
            bias = self.layer.bias * scale + self.shift(c)  # (B, out)
            return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))  # (B, N, out)
        c = c.reshape(c.shape[0], *([1] * (x.dim() - 2)), c.shape[-1])  # (B, 1.., C)
        return self.layer(x) * torch.sigmoid(self.gate(c)) + self.shift(c)


class ConcatSquashMLP(nn.Module):
    """CNF dynamics ``f(t, x, context)`` from ConcatSquash layers (PointFlow's ODE network).

    ``x`` is (B, features) or (B, N, features) (N points sharing one context); ``context`` is
    (B, context_features) or None. The time ``t`` is appended to the context of every layer.
    Points never interact (``pointwise``), so a CNF's exact trace needs only ``features`` backward passes.
    """

    pointwise = True

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        act: str = "tanh",
    ) -> None:
        super().__init__()
        self.context_features = context_features
        sizes = [features, *hidden, features]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b, context_features + 1) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.act = activation(act)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        c = t.to(x).reshape(1, 1).expand(x.shape[0], 1)
        if self.context_features:
            if context is None:
                raise ValueError(f"ConcatSquashMLP built with context_features={self.context_features}; got none")
            c = torch.cat([c, context.reshape(x.shape[0], -1)], dim=1)
        for i, layer in enumerate(self.layers):
            x = layer(x, c)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x
