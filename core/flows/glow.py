"""Glow building blocks: invertible 1x1 convolution (LU), squeeze, multi-scale split, and a Glow step.

All work on (B, C, H, W); ``InvConv1x1`` also on (B, C) and (B, C, L).

References:
    Kingma & Dhariwal, Glow: Generative flow with invertible 1x1 convolutions (2018), arXiv:1807.03039.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.flows.affine import affine_forward, affine_inverse, bound_log_scale, check_scale_bound
from core.flows.base import Flow, Sequential, sum_except_batch
from core.flows.coupling import AdditiveCoupling, AffineCoupling, channel_mask
from core.flows.elementwise import ActNorm

__all__ = ["InvConv1x1", "Squeeze", "Split", "GlowStep"]


class InvConv1x1(Flow):
    """A learned channel mixing ``z = W x`` with ``W = P L (U + diag(sign * exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower- and ``U`` strictly upper-triangular, so the log-det is
    ``sum(log_s)`` per spatial position. Both directions rebuild ``W`` from the current parameters (no cached
    inverse that could go stale after an optimiser step); the inverse uses triangular solves.
    """

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        return (w @ x.reshape(b, c, -1)).reshape(x.shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self._mix(self.weight(), x)
        return z, (self.log_s.sum() * x[0, 0].numel()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        b, c = z.shape[:2]
        y = self.perm.T @ z.reshape(b, c, -1)  # P^-1 = P^T
        y = torch.linalg.solve_triangular(lower, y, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True).reshape(z.shape)
        return x, (-self.log_s.sum() * z[0, 0].numel()).expand(z.shape[0])


class Squeeze(Flow):
    """Space-to-depth: (B, C, H, W) -> (B, C f^2, H/f, W/f), a permutation (log-det 0)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"Squeeze: height and width must be divisible by {f}, got {tuple(x.shape)}")
        x = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * f * f, h // f, w // f), x.new_zeros(b)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = z.shape
        f = self.factor
        if c % (f * f):
            raise ValueError(f"Squeeze.inverse: channels must be divisible by {f * f}, got {tuple(z.shape)}")
        z = z.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // (f * f), h * f, w * f), z.new_zeros(b)


class Split(Flow):
    """Multi-scale factor-out: half of the channels leave the flow, the other half go through ``inner``.

    ``x = [x1, x2]`` along channels; ``z1 = inner(x1)`` and ``x2`` is factored out. With a ``prior``
    network (Glow's learned prior) ``z2 = (x2 - mu(x1)) * exp(-log_sigma(x1))`` so that a standard normal
    on ``z2`` equals the conditional Gaussian ``N(mu(x1), sigma(x1))`` on ``x2``; without one ``z2 = x2``.
    ``inner`` must preserve shape (end a squeezed level with ``Inverse(Squeeze())``), so the latent has the
    shape of the input and the whole multi-scale flow is one ``Flow`` over a single tensor.

    ``prior`` maps (x1, context) to 2 * C2 channels (means, then raw log-scales); ``log_sigma`` is bounded by
    :func:`core.flows.affine.bound_log_scale` (``scale="tanh"``, ``|log_sigma| < bound``, by default).
    """

    def __init__(self, inner: Flow, prior: nn.Module | None = None, scale: str = "tanh", bound: float = 3.0) -> None:
        super().__init__()
        self.inner = inner
        self.prior = prior
        self.scale, self.bound = check_scale_bound(scale, bound), bound

    @staticmethod
    def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
        c1 = x.shape[1] - x.shape[1] // 2
        return x[:, :c1], x[:, c1:]

    def _gaussian(self, x1: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        mean, raw = self.prior(x1, context).chunk(2, dim=1)
        return mean, bound_log_scale(raw, self.scale, self.bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = self._halves(x)
        z1, logdet = self.inner(x1, context)
        if z1.shape != x1.shape:
            raise ValueError(f"Split: inner flow must preserve shape, {tuple(x1.shape)} -> {tuple(z1.shape)}")
        if self.prior is not None:
            mean, log_sigma = self._gaussian(x1, context)
            x2, ld = affine_inverse(x2, mean, log_sigma)  # standardise: z2 = (x2 - mu) / sigma
            logdet = logdet + sum_except_batch(ld)
        return torch.cat([z1, x2], dim=1), logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, z2 = self._halves(z)
        x1, logdet = self.inner.inverse(z1, context)
        if self.prior is not None:
            mean, log_sigma = self._gaussian(x1, context)
            z2, ld = affine_forward(z2, mean, log_sigma)
            logdet = logdet + sum_except_batch(ld)
        return torch.cat([x1, z2], dim=1), logdet


class GlowStep(Sequential):
    """One step of flow: ActNorm -> invertible 1x1 conv -> coupling (channel split, conv conditioner).

    ``coupling="affine"`` (Glow's default) or ``"additive"`` (volume preserving, as NICE and Glow's additive
    variant, which VideoFlow's reference uses for its Stochastic Movement setting).
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        blocks: int = 1,
        context_channels: int = 0,
        scale: str = "sigmoid",
        seed: int = 0,
        coupling: str = "affine",
    ) -> None:
        from core.nn import ConvNet

        if coupling not in ("affine", "additive"):
            raise ValueError(f"GlowStep: coupling must be 'affine' or 'additive', got {coupling!r}")
        mask = channel_mask(channels)
        n_id, n_tr = int(mask.sum()), int((~mask).sum())
        outputs = 2 * n_tr if coupling == "affine" else n_tr
        net = ConvNet(n_id, outputs, hidden=hidden, blocks=blocks, context_channels=context_channels)
        layer = AffineCoupling(mask, net, scale=scale) if coupling == "affine" else AdditiveCoupling(mask, net)
        super().__init__(ActNorm(channels), InvConv1x1(channels, seed=seed), layer)
