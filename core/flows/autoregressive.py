"""Masked autoregressive flows: MADE conditioner, MAF and IAF.

References:
    Germain et al., MADE (2015), arXiv:1502.03509. Papamakarios et al., Masked autoregressive flow (2017),
    arXiv:1705.07057. Kingma et al., Improved variational inference with inverse autoregressive flow (2016),
    arXiv:1606.04934.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.flows.affine import affine_forward, affine_inverse, bound_log_scale, check_scale_bound
from core.flows.base import Flow
from core.nn.mlp import activation

__all__ = ["MADE", "MaskedLinear", "MaskedAffineAutoregressive"]


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out_features, in_features)."""

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def _resolve_order(features: int, order: Sequence[int] | str | None) -> Tensor:
    """Degrees 1..D of the input features: ``None``/"natural", "reverse", or an explicit permutation of 0..D-1
    giving the generation order (first entry is generated first)."""
    if order is None or order == "natural":
        return torch.arange(1, features + 1)
    if order == "reverse":
        return torch.arange(features, 0, -1)
    order = torch.as_tensor(list(order), dtype=torch.long)
    if not torch.equal(torch.sort(order).values, torch.arange(features)):
        raise ValueError(f"order must be a permutation of 0..{features - 1}, got {order.tolist()}")
    degrees = torch.empty(features, dtype=torch.long)
    degrees[order] = torch.arange(1, features + 1)
    return degrees


class MADE(nn.Module):
    """Masked autoencoder: output ``k`` of feature ``i`` depends only on features generated before ``i``.

    Returns (B, num_params, features). ``context`` (B, context_features) enters the first hidden layer
    unmasked, so every output may depend on it.
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (64, 64),
        num_params: int = 2,
        context_features: int = 0,
        order: Sequence[int] | str | None = None,
        act: str = "relu",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MADE needs at least one hidden layer")
        self.features, self.num_params, self.context_features = features, num_params, context_features
        degrees_in = _resolve_order(features, order)
        self.register_buffer("degrees", degrees_in)
        layers: list[nn.Module] = []
        prev = degrees_in
        for i, h in enumerate(hidden):
            deg = (torch.arange(h) % max(features - 1, 1)) + 1 if features > 1 else torch.zeros(h, dtype=torch.long)
            layers.append(MaskedLinear(deg[:, None] >= prev[None, :]))
            if i == 0 and context_features:
                self.context_layer = nn.Linear(context_features, h, bias=False)
            prev = deg
        self.hidden_layers = nn.ModuleList(layers)
        out_deg = degrees_in.repeat(num_params)  # param-major: (num_params * features,)
        self.output_layer = MaskedLinear(out_deg[:, None] > prev[None, :])
        if zero_init:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)
        self.act = activation(act)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.hidden_layers[0](x)
        if self.context_features:
            if context is None:
                raise ValueError(f"MADE built with context_features={self.context_features} but got no context")
            h = h + self.context_layer(context)
        h = self.act(h)
        for layer in self.hidden_layers[1:]:
            h = self.act(layer(h))
        return self.output_layer(h).reshape(x.shape[0], self.num_params, self.features)


class MaskedAffineAutoregressive(Flow):
    """Affine autoregressive flow on (B, features), as MAF or IAF.

    With ``u`` the input of the MADE and ``(shift, s) = MADE(u)``, the *parallel* map is
    ``w = u * exp(s) + shift`` (one MADE pass) and its inverse is *sequential* (one pass per feature, exact).

    * ``mode="maf"``: ``forward`` (density) is parallel, ``inverse`` (sampling) sequential.
    * ``mode="iaf"``: ``inverse`` (sampling) is parallel, ``forward`` (density) sequential.

    ``s`` is bounded by :func:`core.flows.affine.bound_log_scale` (``scale="tanh"`` with ``|s| < bound`` by
    default, ``"sigmoid"`` or ``"none"``).
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        order: Sequence[int] | str | None = None,
        mode: str = "maf",
        scale: str = "tanh",
        act: str = "relu",
        bound: float = 3.0,
    ) -> None:
        super().__init__()
        if mode not in ("maf", "iaf"):
            raise ValueError(f"mode must be 'maf' or 'iaf', got {mode!r}")
        self.mode, self.scale, self.bound = mode, check_scale_bound(scale, bound), bound
        self.made = MADE(features, hidden, 2, context_features, order, act)
        self.register_buffer("generation_order", torch.argsort(self.made.degrees))

    def _shift_log_scale(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        shift, raw = self.made(u, context).unbind(1)
        return shift, bound_log_scale(raw, self.scale, self.bound)

    def _parallel(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        w, log_scale = affine_forward(u, *self._shift_log_scale(u, context))
        return w, log_scale.sum(dim=1)

    def _sequential(self, w: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        u = torch.zeros_like(w)
        logdet = w.new_zeros(w.shape[0])
        for i in self.generation_order.tolist():
            shift, log_scale = self._shift_log_scale(u, context)
            ui, ld = affine_inverse(w[:, i], shift[:, i], log_scale[:, i])
            u = torch.cat([u[:, :i], ui[:, None], u[:, i + 1 :]], dim=1)
            logdet = logdet + ld
        return u, logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._parallel(x, context) if self.mode == "maf" else self._sequential(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._sequential(z, context) if self.mode == "maf" else self._parallel(z, context)
