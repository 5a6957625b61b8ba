"""Coupling flows: NICE (additive) and RealNVP (affine), with the masks they use.

A mask marks the *identity* part (True) that conditions the transform of the rest (False).

* A 1-D mask over dimension 1 (vector features, or channels of images and sequences) splits by index: the
  conditioner sees only the identity features and outputs parameters only for the transformed ones.
* A mask over the non-batch dims (checkerboard) is applied element-wise: the conditioner sees ``x * mask``
  and outputs parameters for every element, of which the masked-out ones are used.

References:
    Dinh et al., NICE (2014), arXiv:1410.8516. Dinh et al., Density estimation using Real NVP (2016),
    arXiv:1605.08803.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.flows.affine import affine_forward, affine_inverse, bound_log_scale, check_scale_bound
from core.flows.base import Flow, sum_except_batch

__all__ = [
    "half_mask",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "AdditiveCoupling",
    "AffineCoupling",
]


def half_mask(features: int, first: bool = True) -> Tensor:
    """True on the first half of ``features`` (or the second with ``first=False``)."""
    mask = torch.arange(features) < (features + 1) // 2
    return mask if first else ~mask


def alternating_mask(features: int, parity: int = 0) -> Tensor:
    """True on even (``parity=0``) or odd (``parity=1``) feature indices."""
    return torch.arange(features) % 2 == parity


def channel_mask(channels: int, first: bool = True) -> Tensor:
    """Channel-wise split for (B, C, ...) tensors: the same as ``half_mask`` over dimension 1."""
    return half_mask(channels, first)


def checkerboard_mask(*spatial: int, parity: int = 0) -> Tensor:
    """Checkerboard over the spatial dims, shape (1, *spatial) so it broadcasts over channels.

    ``checkerboard_mask(H, W)`` for images, ``checkerboard_mask(L)`` for sequences.
    """
    grids = torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij")
    return (sum(grids) % 2 == parity).unsqueeze(0)


class _Coupling(Flow):
    """Shared machinery: split by mask, call the conditioner, merge. Subclasses define the element map."""

    num_params: int

    def __init__(self, mask: Tensor, conditioner: nn.Module) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.all() or not mask.any():
            raise ValueError("coupling mask must have both identity (True) and transformed (False) entries")
        self.conditioner = conditioner
        self.by_index = mask.dim() == 1
        self.register_buffer("mask", mask)
        if self.by_index:
            self.register_buffer("identity_idx", mask.nonzero().squeeze(1))
            self.register_buffer("transform_idx", (~mask).nonzero().squeeze(1))

    # element-wise map on the transformed part: (x, params) -> (y, log|dy/dx| element-wise)
    def _map(self, x: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _unmap(self, y: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _params(self, x_identity: Tensor, context: Tensor | None) -> list[Tensor]:
        out = self.conditioner(x_identity, context)
        return list(out.chunk(self.num_params, dim=1))

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        fn = self._unmap if inverse else self._map
        if self.by_index:
            if x.shape[1] != self.mask.numel():
                raise ValueError(f"coupling: expected {self.mask.numel()} features on dim 1, got {tuple(x.shape)}")
            params = self._params(x.index_select(1, self.identity_idx), context)
            y, ld = fn(x.index_select(1, self.transform_idx), params)
            # under autocast the map can come back wider than x (exp runs in float32): the flow's state takes the
            # wider dtype, never a rounded one
            dtype = torch.promote_types(x.dtype, y.dtype)
            return x.to(dtype).index_copy(1, self.transform_idx, y.to(dtype)), sum_except_batch(ld)
        mask = self.mask.to(x.dtype)
        x_identity = x * mask
        params = self._params(x_identity, context)
        y, ld = fn(x, params)
        return x_identity + (1 - mask) * y, sum_except_batch(ld * (1 - mask))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, context, inverse=True)


class AdditiveCoupling(_Coupling):
    """NICE: ``z_B = x_B + t(x_A, context)``, volume preserving (log-det 0).

    The conditioner maps the identity part (and context) to as many outputs as there are transformed
    features (index masks) or input features (element-wise masks).

    Example:
        >>> from core.nn import MLP
        >>> layer = AdditiveCoupling(half_mask(4), MLP(2, 2))
        >>> z, logdet = layer(torch.randn(8, 4))
    """

    num_params = 1

    def _map(self, x: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        return x + params[0], torch.zeros_like(x)

    def _unmap(self, y: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        return y - params[0], torch.zeros_like(y)


class AffineCoupling(_Coupling):
    """RealNVP: ``z_B = x_B * exp(s) + t`` with ``(t, s_raw) = conditioner(x_A, context)``.

    The conditioner outputs 2x the transformed features: shifts first, raw log-scales second. The log-scale is
    bounded by :func:`core.flows.affine.bound_log_scale`: ``scale="tanh"`` (default, ``|s| < bound``),
    ``"sigmoid"`` (Glow) or ``"none"``.
    """

    num_params = 2

    def __init__(self, mask: Tensor, conditioner: nn.Module, scale: str = "tanh", bound: float = 3.0) -> None:
        super().__init__(mask, conditioner)
        self.scale = check_scale_bound(scale, bound)
        self.bound = bound

    def _map(self, x: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        shift, raw = params
        return affine_forward(x, shift, bound_log_scale(raw, self.scale, self.bound))

    def _unmap(self, y: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        shift, raw = params
        return affine_inverse(y, shift, bound_log_scale(raw, self.scale, self.bound))
