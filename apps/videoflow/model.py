"""VideoFlow (Kumar et al. 2020): a per-frame multi-scale Glow and an autoregressive latent dynamics prior.

Every frame x_t is mapped by the same invertible multi-scale Glow to latents ``z_t = (z_t^0, ..., z_t^{L-1})``
(level 0 the finest, L-1 the top). The prior factorises over time and, within a time step, from the top level
down::

    p(z_t^l | z_<t, z_t^{>l}) = N(mu, sigma),   (mu - z_{t-1}^l, log sigma) = NN(z_{t-K..t-1}^l, z_t^{>l})

with NN the reference's temporal network (``prior=conv3d``, :class:`TemporalGaussian`; tensor2tensor
``glow_ops.temporal_latent_to_dist``): ``latent_encoder_depth`` causal 3-D residual blocks with (2, 3, 3) filters
over the K = ``num_cond`` previous latents of the level, left time padding with an indicator channel, gated
activations and dilated parallel stacks, time collapsed only by the final 1x1 convolution; ``latent_skip``: the mean
is the previous latent plus the network's output. The first K frames, which have no K predecessors, use the level's
unconditional prior (as the reference). ``prior=light`` (:class:`LightTemporalGaussian`) is a cheaper network for
CPU runs. The whole map video -> standardised noise is one :class:`Flow` (:class:`VideoFlowTransform`): the
Jacobian is block triangular in (time, level), so the log-det is the Glow log-dets plus ``-sum log sigma``.
Density (``forward``) is one parallel pass over all frames; sampling (``inverse``) is sequential in time, top level
first.

References:
    Kumar et al., VideoFlow: A Conditional Flow-Based Model for Stochastic Video Generation (ICLR 2020),
    arXiv:1903.01434.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.flows import ActNorm, Squeeze, UniformDequantization
from core.flows.affine import affine_forward, affine_inverse, bound_log_scale, check_scale_bound
from core.flows.base import Flow, sum_except_batch
from core.nn import ConvNet
from core.presets import glow

__all__ = [
    "FrameGlow",
    "CausalConv3d",
    "ConvStack3d",
    "TemporalResNet3d",
    "TemporalPrior",
    "TemporalGaussian",
    "LightTemporalGaussian",
    "PRIORS",
    "VideoFlowTransform",
    "VideoFlowModel",
    "dilation_rates",
    "to_nbit",
    "from_nbit",
]

_LOG_2PI = math.log(2 * math.pi)


def to_nbit(x: Tensor, bits: int) -> Tensor:
    """uint8 values 0..255 -> integers 0..2^bits-1 (dropping the low bits, as Glow's n_bits_x)."""
    return torch.div(x.to(torch.int32), 2 ** (8 - bits), rounding_mode="floor")


def from_nbit(x: Tensor, bits: int) -> Tensor:
    """Integers 0..2^bits-1 -> uint8, each value at the centre of its 8-bit bin."""
    step = 2 ** (8 - bits)
    return (x.to(torch.int32) * step + step // 2).clamp(0, 255).to(torch.uint8)


class FrameGlow(Flow):
    """Per-frame multi-scale Glow, (B, C, H, W) -> z of the same shape, with access to every level's latent.

    The transform is :func:`core.presets.glow` without Glow's learned split priors (VideoFlow puts its own
    conditional prior on every level), so the latent of level l leaves the flow unchanged at its split and can be
    read back with :meth:`split_levels`: after l+1 squeezes of z, the second half of the channels is z^l and the
    first half holds the coarser levels ("h^l", what z^l is conditioned on within the frame).
    """

    def __init__(
        self,
        channels: int,
        size: int,
        levels: int = 3,
        steps: int = 8,
        hidden: int = 128,
        blocks: int = 1,
        coupling: str = "affine",
    ) -> None:
        super().__init__()
        shape = (channels, size, size)
        self.flow = glow(shape, levels, steps, hidden, blocks, learned_prior=False, coupling=coupling).transform
        self.num_levels = levels
        self.squeeze = Squeeze()
        shapes, cond, c, s = [], [], channels, size
        for level in range(levels):
            c, s = c * 4, s // 2
            if level == levels - 1:
                shapes.append((c, s, s))
                cond.append(0)
            else:
                keep = c - c // 2
                shapes.append((c // 2, s, s))
                cond.append(keep)
                c = keep
        self.level_shapes: list[tuple[int, int, int]] = shapes  # z^l: (C_l, H_l, W_l)
        self.cond_channels: list[int] = cond  # channels of h^l (0 for the top level)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(z, context)

    def split_levels(self, z: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """z (B, C, H, W) -> ([z^0, ..., z^{L-1}], [h^0, ..., h^{L-2}, None]); a permutation, no copies of values."""
        zs, hs, h = [], [], z
        for level in range(self.num_levels):
            s = self.squeeze(h)[0]
            if level == self.num_levels - 1:
                zs.append(s)
                hs.append(None)
            else:
                c1 = s.shape[1] - s.shape[1] // 2
                h = s[:, :c1]
                zs.append(s[:, c1:])
                hs.append(h)
        return zs, hs

    def unsqueeze(self, s: Tensor) -> Tensor:
        return self.squeeze.inverse(s)[0]

    def merge_levels(self, zs: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split_levels`: the level latents -> z (B, C, H, W)."""
        h = self.unsqueeze(zs[-1])
        for level in range(self.num_levels - 2, -1, -1):
            h = self.unsqueeze(torch.cat([h, zs[level]], dim=1))
        return h


def _pad_with_indicator(x: Tensor, time: int, space: int) -> Tensor:
    """Zero-pad (N, C, T, H, W) by ``time`` frames on the left (past) and ``space`` pixels on each side, with a
    channel in front that is 1 on padded positions and 0 on real ones (tensor2tensor's ``time_pad``; with 4-D
    input (N, C, H, W) and ``time=0``, its ``add_edge_bias``)."""
    pad = (space, space, space, space) + ((time, 0) if x.dim() == 5 else ())
    indicator = F.pad(x.new_zeros(x.shape[0], 1, *x.shape[2:]), pad, value=1.0)
    return torch.cat([indicator, F.pad(x, pad)], dim=1)


class _ZeroConv(nn.Module):
    """A zero-initialised convolution whose output is scaled by ``exp(3 * logs)`` (Glow's ``conv_init="zeros"``
    layers: the network starts at mean 0, log-scale 0)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        self.logs = nn.Parameter(torch.zeros(conv.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.exp(3.0 * self.logs).reshape(1, -1, *([1] * (x.dim() - 2)))
        return self.conv(x) * scale


class CausalConv3d(nn.Module):
    """A (kt, 3, 3) convolution over (N, C, T, H, W), spatial dilation ``dilation``, output length T: the input is
    padded with ``kt - 1`` frames on the left (so output t sees frames t-kt+1..t only) and by the dilation in
    space, with the padding-indicator channel (:func:`_pad_with_indicator`). ``zero=True``: a zero-initialised
    output layer (:class:`_ZeroConv`); otherwise N(0, 0.05^2) weights without bias (an ActNorm follows)."""

    def __init__(self, in_channels: int, out_channels: int, kt: int = 2, dilation: int = 1, zero: bool = False) -> None:
        super().__init__()
        self.kt, self.dilation = kt, dilation
        conv = nn.Conv3d(in_channels + 1, out_channels, (kt, 3, 3), dilation=(1, dilation, dilation), bias=zero)
        if zero:
            self.conv: nn.Module = _ZeroConv(conv)
        else:
            nn.init.normal_(conv.weight, std=0.05)
            self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_pad_with_indicator(x, self.kt - 1, self.dilation))


class _FrameActNorm(nn.Module):
    """ActNorm (data-dependent initialisation) with its own scale and bias per channel and per time position,
    on (N, C, T, H, W): tensor2tensor's ``actnorm_3d``, as :class:`core.flows.ActNorm` over C x T channels."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels * frames)

    def forward(self, x: Tensor) -> Tensor:
        n, c, t, h, w = x.shape
        return self.norm(x.reshape(n, c * t, h, w))[0].reshape(n, c, t, h, w)


class ConvStack3d(nn.Module):
    """tensor2tensor's ``conv_stack`` on (N, R, K, H, W): causal (kt, 3, 3) conv to ``hidden`` + ActNorm + ReLU;
    1x1x1 conv + ActNorm + ReLU (``relu``) or ``tanh(.) * sigmoid(.)`` of two such (``gatu``); a zero-initialised
    causal (kt, 3, 3) conv back to R channels. Both 3x3 convolutions use the spatial ``dilation``."""

    def __init__(self, channels: int, hidden: int, frames: int, dilation: int = 1, activation: str = "gatu") -> None:
        super().__init__()
        if activation not in ("relu", "gatu"):
            raise ValueError(f"prior activation {activation!r}: choose relu or gatu")
        kt = 2 if frames > 1 else 1  # one frame: (1, 3, 3) filters, as the reference
        self.activation = activation
        self.conv_in = CausalConv3d(channels, hidden, kt, dilation)
        self.norm_in = _FrameActNorm(hidden, frames)
        n_mid = 2 if activation == "gatu" else 1
        self.conv_mid = nn.ModuleList(nn.Conv3d(hidden, hidden, 1, bias=False) for _ in range(n_mid))
        for conv in self.conv_mid:
            nn.init.normal_(conv.weight, std=0.05)
        self.norm_mid = nn.ModuleList(_FrameActNorm(hidden, frames) for _ in range(n_mid))
        self.conv_out = CausalConv3d(hidden, channels, kt, dilation, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm_in(self.conv_in(x)))
        mid = [norm(conv(h)) for conv, norm in zip(self.conv_mid, self.norm_mid)]
        h = torch.tanh(mid[0]) * torch.sigmoid(mid[1]) if self.activation == "gatu" else F.relu(mid[0])
        return self.conv_out(h)


def dilation_rates(rates: Sequence[int], size: int | None) -> list[int]:
    """Spatial dilations of the prior's parallel stacks, as tensor2tensor's ``get_dilation_rates``: always 1, and
    ``rate + 1`` for each rate whose effective 3x3 filter (``3 + 2 rate``) fits in the latent's width ``size``."""
    return [1] + [r + 1 for r in rates if size is None or 3 + 2 * r <= size]


class TemporalResNet3d(nn.Module):
    """tensor2tensor's ``temporal_latent_to_dist``: (N, R, K, H, W) -> (mean, raw log-scale), each (N, C, H, W).

    ``depth`` residual blocks ``h += sum_d ConvStack3d_d(h)`` (one stack per spatial dilation d), all causal in
    time with left padding, so the last position sees all K frames; time is collapsed only at the end, by taking
    that last position, then a zero-initialised 1x1 convolution gives the mean and log-scale."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        hidden: int,
        depth: int,
        frames: int,
        dilations: Sequence[int] = (1,),
        activation: str = "gatu",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(ConvStack3d(channels, hidden, frames, d, activation) for d in dilations) for _ in range(depth)
        )
        self.out = _ZeroConv(nn.Conv2d(channels, 2 * out_channels, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x
        for block in self.blocks:
            h = h + sum(stack(h) for stack in block)
        mean, raw = self.out(h[:, :, -1]).chunk(2, dim=1)
        return mean, raw


class TemporalPrior(Flow):
    """The latent dynamics prior of one level as a flow on latent sequences (B, T, C, H, W).

    ``forward`` standardises ``eps_t = (z_t - mu_t) / sigma_t`` with ``(mu_t, log sigma_t)`` from :meth:`params`
    (every t in one pass, causal); ``inverse`` runs over t with :meth:`step` (one frame at a time, equal to
    ``params`` at that step). ``context`` (B, T, Cc, H, W) holds the coarser levels of the same time step.
    ``log sigma`` is bounded by :func:`core.flows.affine.bound_log_scale` (``scale="tanh"``:
    ``scale_bound * tanh(raw / scale_bound)``). Subclasses give the network.
    """

    def __init__(
        self,
        channels: int,
        context_channels: int = 0,
        num_cond: int = 3,
        latent_skip: bool = True,
        scale_bound: float = 5.0,
        scale: str = "tanh",
    ) -> None:
        super().__init__()
        if num_cond < 1:
            raise ValueError(f"{type(self).__name__}: num_cond must be >= 1, got {num_cond}")
        self.channels, self.context_channels, self.num_cond = channels, context_channels, num_cond
        self.latent_skip, self.scale_bound = latent_skip, scale_bound
        self.scale = check_scale_bound(scale, scale_bound)

    def _check_context(self, context: Tensor | None) -> None:
        if self.context_channels and context is None:
            raise ValueError(
                f"{type(self).__name__} was built with context_channels={self.context_channels} but got none"
            )

    def params(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Means and log-scales (B, T, C, H, W) of p(z_t | z_<t, context_t) for every t, in one pass (causal)."""
        raise NotImplementedError

    def step(self, history: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and log-scale (B, C, H, W) of the next latent given ``history`` (B, k, C, H, W), the k >= 0 latents
        so far, and the context of the next step (B, Cc, H, W). Equals :meth:`params` at that step (tested)."""
        raise NotImplementedError

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        eps, ld = affine_inverse(z, *self.params(z, context))  # standardise: eps = (z - mu) / sigma
        return eps, sum_except_batch(ld)

    def inverse(self, eps: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        zs: list[Tensor] = []
        logdet = eps.new_zeros(eps.shape[0])
        for t in range(eps.shape[1]):
            history = torch.stack(zs[-self.num_cond :], dim=1) if zs else eps.new_zeros(eps.shape[0], 0, *eps.shape[2:])
            z_t, ld = affine_forward(eps[:, t], *self.step(history, None if context is None else context[:, t]))
            zs.append(z_t)
            logdet = logdet + sum_except_batch(ld)
        return torch.stack(zs, dim=1), logdet


class TemporalGaussian(TemporalPrior):
    """The reference prior (``prior=conv3d``; tensor2tensor ``latent_dist_encoder="conv3d_net"``).

    For t >= K (``num_cond``): the K previous latents of the level (stacked in time), with the level prior's mean
    given the coarser levels of step t tiled over those K frames (levels below the top), go through
    :class:`TemporalResNet3d` (``blocks`` causal 3-D residual blocks of width ``hidden``, gated activations,
    dilations); ``latent_skip``: ``mu = z_{t-1} + f``. For t < K, where fewer than K latents exist, the level's
    unconditional prior: a zero-initialised 3x3 convolution (with the edge indicator) of the coarser levels, or
    of nothing at the top level (a learned map), as tensor2tensor's ``level_prior`` / ``top_learn_prior``.
    ``size``: the latent's width, which decides the dilations that fit (``get_dilation_rates``).
    """

    def __init__(
        self,
        channels: int,
        context_channels: int = 0,
        num_cond: int = 3,
        hidden: int = 64,
        blocks: int = 5,
        activation: str = "gatu",
        dilations: Sequence[int] = (1, 3),
        size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(channels, context_channels, num_cond, **kwargs)
        self.level_prior = _ZeroConv(nn.Conv2d(context_channels + 1, 2 * channels, 3))
        inputs = channels + (channels if context_channels else 0)
        self.net = TemporalResNet3d(
            inputs, channels, hidden, blocks, num_cond, dilation_rates(dilations, size), activation
        )

    def marginal(self, context: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """The unconditional prior's (mean, raw log-scale) (N, C, H, W) given the coarser levels (N, Cc, H, W)."""
        self._check_context(context)
        x = context if self.context_channels else like.new_zeros(like.shape[0], 0, *like.shape[-2:])
        mean, raw = self.level_prior(_pad_with_indicator(x, 0, 1)).chunk(2, dim=1)
        return mean, raw

    def conditional(self, window: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mean, raw log-scale) (N, C, H, W) given the K previous latents (N, K, C, H, W)."""
        seq = window.transpose(1, 2)  # (N, C, K, H, W)
        if self.context_channels:
            loc = self.marginal(context, window)[0]
            seq = torch.cat([seq, loc[:, :, None].expand(-1, -1, window.shape[1], -1, -1)], dim=1)
        mean, raw = self.net(seq)
        if self.latent_skip:
            mean = mean + window[:, -1]
        return mean, raw

    def params(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        b, t = z.shape[:2]
        k, m = self.num_cond, min(t, self.num_cond)
        ctx = context
        first = self.marginal(None if ctx is None else ctx[:, :m].flatten(0, 1), z[:, :m].flatten(0, 1))
        parts = [[v.reshape(b, m, *z.shape[2:]) for v in first]]
        if t > k:  # the window of frames t-K..t-1 for every t >= K
            windows = torch.stack([z[:, s : s + k] for s in range(t - k)], dim=1).flatten(0, 1)
            rest = self.conditional(windows, None if ctx is None else ctx[:, k:].flatten(0, 1))
            parts.append([v.reshape(b, t - k, *z.shape[2:]) for v in rest])
        mean, raw = (torch.cat(vs, dim=1) for vs in zip(*parts))
        return mean, bound_log_scale(raw, self.scale, self.scale_bound)

    def step(self, history: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if history.shape[1] < self.num_cond:
            mean, raw = self.marginal(context, history)
        else:
            mean, raw = self.conditional(history[:, -self.num_cond :], context)
        return mean, bound_log_scale(raw, self.scale, self.scale_bound)


class LightTemporalGaussian(TemporalPrior):
    """A lighter prior for CPU runs (``prior=light``): one K x 3 x 3 convolution collapses time at once, then a
    2-D network.

    Frames before the first one are zeros with a "present" indicator channel of 0, so the first K steps have their
    own (learned) distribution. Network: a 3-D convolution (K x 3 x 3) over the K previous latents (+ indicator),
    ReLU, then :class:`core.nn.ConvNet` (3x3 conv on the features with the context concatenated, residual blocks,
    zero-initialised 3x3 output conv) per time step. ``latent_skip``: ``mu = z_{t-1} + f``.
    """

    def __init__(
        self, channels: int, context_channels: int = 0, num_cond: int = 3, hidden: int = 64, blocks: int = 2, **kwargs
    ) -> None:
        super().__init__(channels, context_channels, num_cond, **kwargs)
        self.temporal = nn.Conv3d(channels + 1, hidden, (num_cond, 3, 3), padding=(0, 1, 1))
        self.net = ConvNet(hidden, 2 * channels, hidden, blocks, context_channels)

    def _history(self, z: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (B, C+1, T+K-1, H, W): K zero frames (indicator 0) in front, the last frame dropped,
        so that a valid K-frame convolution at output t sees exactly z_{t-K..t-1}."""
        b, t, c, h, w = z.shape
        ind = z.new_ones(b, t, 1, h, w)
        seq = torch.cat([z, ind], dim=2).transpose(1, 2)  # (B, C+1, T, H, W)
        return F.pad(seq, (0, 0, 0, 0, self.num_cond, 0))[:, :, : t + self.num_cond - 1]

    def params(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        b, t = z.shape[:2]
        feats = F.relu(self.temporal(self._history(z)))  # (B, hidden, T, H, W)
        feats = feats.transpose(1, 2).reshape(b * t, -1, *z.shape[3:])
        ctx = None if context is None else context.reshape(b * t, *context.shape[2:])
        mean, raw = self.net(feats, ctx).reshape(b, t, 2 * self.channels, *z.shape[3:]).chunk(2, dim=2)
        if self.latent_skip:
            prev = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)
            mean = mean + prev
        return mean, bound_log_scale(raw, self.scale, self.scale_bound)

    def step(self, history: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        b, n, _, h, w = history.shape
        k = min(n, self.num_cond)
        window = history[:, n - k :]
        seq = torch.cat([window, window.new_ones(b, k, 1, h, w)], dim=2).transpose(1, 2)  # (B, C+1, k, H, W)
        seq = F.pad(seq, (0, 0, 0, 0, self.num_cond - k, 0))  # (B, C+1, K, H, W)
        feats = F.relu(self.temporal(seq))[:, :, 0]  # (B, hidden, H, W)
        mean, raw = self.net(feats, context).chunk(2, dim=1)
        if self.latent_skip and k > 0:
            mean = mean + window[:, -1]
        return mean, bound_log_scale(raw, self.scale, self.scale_bound)


PRIORS = {"conv3d": TemporalGaussian, "light": LightTemporalGaussian}


class VideoFlowTransform(Flow):
    """Videos (B, T, C, H, W) -> standardised noise of the same shape: per-frame Glow, then every level's
    temporal prior (``prior``: a key of :data:`PRIORS`). The log-det (per video, or per frame with
    :meth:`frame_forward`) is exact."""

    def __init__(
        self,
        channels: int,
        size: int,
        levels: int = 3,
        steps: int = 8,
        hidden: int = 128,
        blocks: int = 1,
        num_cond: int = 3,
        prior: str = "conv3d",
        prior_hidden: int = 64,
        prior_blocks: int = 5,
        prior_activation: str = "gatu",
        prior_dilations: Sequence[int] = (1, 3),
        latent_skip: bool = True,
        scale_bound: float = 5.0,
        coupling: str = "affine",
    ) -> None:
        super().__init__()
        if size % 2**levels:
            raise ValueError(f"VideoFlow: frame size {size} must be divisible by 2**levels = {2**levels}")
        if prior not in PRIORS:
            raise ValueError(f"model.prior={prior!r}: choose one of {', '.join(PRIORS)}")
        self.glow = FrameGlow(channels, size, levels, steps, hidden, blocks, coupling)
        common = dict(num_cond=num_cond, hidden=prior_hidden, blocks=prior_blocks, latent_skip=latent_skip,
                      scale_bound=scale_bound)  # fmt: skip
        if prior == "conv3d":
            common.update(activation=prior_activation, dilations=tuple(prior_dilations))
        self.priors = nn.ModuleList(
            PRIORS[prior](shape[0], cond, **common, **({"size": shape[1]} if prior == "conv3d" else {}))
            for shape, cond in zip(self.glow.level_shapes, self.glow.cond_channels)
        )

    @property
    def num_cond(self) -> int:
        return self.priors[0].num_cond

    def encode(self, video: Tensor) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
        """Frames -> per-level latents (B, T, C_l, H_l, W_l), their in-frame contexts, Glow log-det (B, T)."""
        b, t = video.shape[:2]
        z, logdet = self.glow(video.reshape(b * t, *video.shape[2:]))
        zs, hs = self.glow.split_levels(z)
        seq = [v.reshape(b, t, *v.shape[1:]) for v in zs]
        ctx = [None if h is None else h.reshape(b, t, *h.shape[1:]) for h in hs]
        return seq, ctx, logdet.reshape(b, t)

    def frame_forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(eps (B, T, C, H, W), log-det per frame (B, T)); frame t's log-det includes its prior's -sum log sigma."""
        b, t = video.shape[:2]
        zs, hs, logdet = self.encode(video)
        eps_levels = []
        for prior, z, h in zip(self.priors, zs, hs):
            eps, ld = affine_inverse(z, *prior.params(z, h))
            eps_levels.append(eps.reshape(b * t, *z.shape[2:]))
            logdet = logdet + ld.reshape(b, t, -1).sum(-1)
        eps = self.glow.merge_levels(eps_levels).reshape(video.shape)
        return eps, logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        eps, logdet = self.frame_forward(x)
        return eps, logdet.sum(1)

    def decode_step(self, eps_levels: list[Tensor], history: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """One time step, top level first: noise per level (B, C_l, H_l, W_l) and each level's history
        (B, k, C_l, H_l, W_l) -> the step's latents per level and the prior's log-det (B,)."""
        levels = self.glow.num_levels
        zs: list[Tensor] = [None] * levels  # type: ignore[list-item]
        logdet = eps_levels[0].new_zeros(eps_levels[0].shape[0])
        h = None
        for level in range(levels - 1, -1, -1):
            zs[level], ld = affine_forward(eps_levels[level], *self.priors[level].step(history[level], h))
            logdet = logdet + sum_except_batch(ld)
            s = zs[level] if h is None else torch.cat([h, zs[level]], dim=1)
            h = self.glow.unsqueeze(s) if level > 0 else None
        return zs, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, t = z.shape[:2]
        frames, logdet = [], z.new_zeros(b)
        history = [z.new_zeros(b, 0, *shape) for shape in self.glow.level_shapes]
        for i in range(t):
            eps_levels, _ = self.glow.split_levels(z[:, i])
            zs, ld = self.decode_step(eps_levels, history)
            history = [torch.cat([hist, lv[:, None]], dim=1)[:, -self.num_cond :] for hist, lv in zip(history, zs)]
            x, ld_glow = self.glow.inverse(self.glow.merge_levels(zs))
            frames.append(x)
            logdet = logdet + ld + ld_glow
        return torch.stack(frames, dim=1), logdet


class VideoFlowModel(nn.Module):
    """VideoFlow on uint8 videos (B, T, C, H, W): n-bit quantisation, uniform dequantisation, the flow, N(0, I).

    ``frame_log_prob`` gives log P(x_t | x_<t) in nats of the discrete n-bit frame (a stochastic lower bound: uniform
    dequantisation noise, in training and evaluation alike); ``log_prob`` sums it over the frames after the
    ``context_frames`` conditioning ones.
    """

    def __init__(
        self,
        channels: int = 3,
        size: int = 64,
        bits: int = 8,
        levels: int = 3,
        steps: int = 8,
        hidden: int = 128,
        blocks: int = 1,
        context_frames: int = 3,
        num_cond: int = 3,
        prior: str = "conv3d",
        prior_hidden: int = 64,
        prior_blocks: int = 5,
        prior_activation: str = "gatu",
        prior_dilations: Sequence[int] = (1, 3),
        latent_skip: bool = True,
        scale_bound: float = 5.0,
        coupling: str = "affine",
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"model.bits={bits}: expected 1..8 bits per channel")
        if prior == "conv3d" and num_cond > context_frames:
            raise ValueError(
                f"model.num_cond={num_cond} > context_frames={context_frames}: with prior=conv3d the first num_cond "
                "frames use the unconditional prior, so target frames would not see the context (the reference sets "
                "num_cond = context frames)"
            )
        self.channels, self.size, self.bits, self.context_frames = channels, size, bits, context_frames
        self.dequant = UniformDequantization(2**bits)
        self.transform = VideoFlowTransform(
            channels, size, levels, steps, hidden, blocks, num_cond, prior, prior_hidden, prior_blocks,
            prior_activation, prior_dilations, latent_skip, scale_bound, coupling,
        )  # fmt: skip

    def _check(self, video: Tensor) -> None:
        if video.dim() != 5 or tuple(video.shape[2:]) != (self.channels, self.size, self.size):
            raise ValueError(
                f"VideoFlow: expected videos (B, T, {self.channels}, {self.size}, {self.size}), "
                f"got {tuple(video.shape)}"
            )

    def preprocess(self, video: Tensor, noise: bool = True) -> tuple[Tensor, Tensor]:
        """uint8 video -> the flow's input in [-0.5, 0.5) and the dequantisation log-det per frame (B, T).

        ``noise=True`` (every likelihood, training or not): uniform noise in each bin, so that the log-likelihood is
        a lower bound on the discrete one. ``noise=False``: the bin centres, to encode context frames for sampling.
        Evaluating a density at bin centres is no bound (it can exceed 1 / bin width: negative bits per pixel)."""
        self._check(video)
        b, t = video.shape[:2]
        frames = to_nbit(video, self.bits).reshape(b * t, *video.shape[2:]).to(self.dequant_dtype)
        if noise:
            y, logdet = self.dequant(frames)
        else:
            with self.dequant.centered():
                y, logdet = self.dequant(frames)
        return (y - 0.5).reshape(video.shape), logdet.reshape(b, t)

    @property
    def dequant_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def frame_log_prob(self, video: Tensor) -> Tensor:
        """log P(x_t | x_<t) in nats for every frame, (B, T)."""
        y, logdet = self.preprocess(video)
        eps, ld = self.transform.frame_forward(y)
        b, t = video.shape[:2]
        base = -0.5 * eps.reshape(b, t, -1).square().sum(-1) - 0.5 * _LOG_2PI * eps[0, 0].numel()
        return base + ld + logdet

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-likelihood (B,) of the frames after the first ``context_frames``, given them."""
        return self.frame_log_prob(x)[:, self.context_frames :].sum(1)

    @torch.no_grad()
    def predict(self, context: Tensor, steps: int, temperature: float = 1.0) -> Tensor:
        """Sample ``steps`` future frames (B, steps, C, H, W) uint8 given context frames (B, K, C, H, W) uint8."""
        y, _ = self.preprocess(context, noise=False)
        zs, _, _ = self.transform.encode(y)
        k = self.transform.num_cond
        history = [z[:, -k:] for z in zs]
        frames = []
        for _ in range(steps):
            eps = [
                temperature * torch.randn(len(y), *s, device=y.device, dtype=y.dtype)
                for s in self.transform.glow.level_shapes
            ]
            z_levels, _ = self.transform.decode_step(eps, history)
            history = [torch.cat([hist, lv[:, None]], dim=1)[:, -k:] for hist, lv in zip(history, z_levels)]
            x, _ = self.transform.glow.inverse(self.transform.glow.merge_levels(z_levels))
            ints, _ = self.dequant.inverse(x + 0.5)
            frames.append(from_nbit(ints, self.bits))
        return torch.stack(frames, dim=1)
