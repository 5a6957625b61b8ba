"""The element-wise affine map shared by every affine flow layer, and the bound on its log-scale.

Parameter-free maths, as zuko's ``transforms.py``: layers compute ``(shift, raw)`` with their own networks, bound
the raw log-scale with :func:`bound_log_scale`, and apply :func:`affine_forward` / :func:`affine_inverse`::

    y = x * exp(s) + t,    x = (y - t) * exp(-s),    log|dy/dx| = s (element-wise)

Both directions return the element-wise log-scale of the direction taken (``s`` forward, ``-s`` inverse); callers
sum it over the dims they need (all but the batch, or those a mask selects).

Bounds (``scale=``), named so that a layer's choice is a config value:

* ``"none"``: ``s = raw`` (unbounded; WaveFlow).
* ``"tanh"``: ``s = bound * tanh(raw / bound)``, a soft clamp to (-bound, bound) that is the identity near zero
  (RealNVP, MAF, GraphAF, Glow's learned prior, VideoFlow's prior).
* ``"sigmoid"``: ``s = log sigmoid(raw + 2)``, scales in (0, 1), starting near 0.88 (Glow's affine coupling).

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x, t, raw = torch.randn(2, 3), torch.randn(2, 3), 10 * torch.randn(2, 3)
    >>> s = bound_log_scale(raw, "tanh", bound=3.0)
    >>> y, ld = affine_forward(x, t, s)
    >>> x_rec, ld_inv = affine_inverse(y, t, s)
    >>> bool(torch.allclose(x_rec, x, atol=1e-5)), bool((ld + ld_inv == 0).all()), bool((s.abs() <= 3).all())
    (True, True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SCALE_BOUNDS", "check_scale_bound", "bound_log_scale", "affine_forward", "affine_inverse"]

SCALE_BOUNDS = ("none", "tanh", "sigmoid")


def check_scale_bound(scale: str, bound: float = 3.0) -> str:
    """Validate a bound name (and the tanh constant) when a layer is built, not at its first batch."""
    if scale not in SCALE_BOUNDS:
        raise ValueError(f"unknown scale bound {scale!r}; choose one of {', '.join(SCALE_BOUNDS)}")
    if scale == "tanh" and not bound > 0:
        raise ValueError(f"the tanh scale bound needs a positive constant, got bound={bound}")
    return scale


def bound_log_scale(raw: Tensor, scale: str = "tanh", bound: float = 3.0) -> Tensor:
    """Log-scale ``s`` from an unconstrained network output ``raw`` under the named bound (see the module doc).

    ``bound`` is the tanh constant ``c`` (``|s| <= c``, equal only where tanh saturates in floating point); the
    other bounds ignore it.
    """
    if scale == "tanh":
        return bound * torch.tanh(raw / bound)
    if scale == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    if scale == "none":
        return raw
    check_scale_bound(scale)  # raises, naming the choices
    raise AssertionError("unreachable")


def affine_forward(x: Tensor, shift: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``y = x * exp(log_scale) + shift``; returns ``(y, log_scale)``, the element-wise ``log|dy/dx|``."""
    return x * log_scale.exp() + shift, log_scale


def affine_inverse(y: Tensor, shift: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``x = (y - shift) * exp(-log_scale)``; returns ``(x, -log_scale)``, the element-wise ``log|dx/dy|``."""
    neg = -log_scale
    return (y - shift) * neg.exp(), neg
