"""Ready-made flows with typed keyword arguments (the configs name these as ``_target_``).

Each returns a :class:`FlowModel` with a standard normal base, for vectors of ``features`` dimensions
(``glow`` for images). ``context_features`` makes every layer conditional.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.distributions import FlowModel, StandardNormal
from core.flows import (
    CNF,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ElementwiseAffine,
    GlowStep,
    InvConv1x1,
    Inverse,
    MaskedAffineAutoregressive,
    RandomPermutation,
    Reverse,
    Sequential,
    Split,
    Squeeze,
    alternating_mask,
)
from core.flows.base import Flow
from core.nn import MLP, ConcatSquashMLP, ConvNet

__all__ = ["realnvp", "nice", "maf", "iaf", "glow_like", "cnf", "cnf_stack", "glow"]


def _coupling_stack(features: int, transforms: int, hidden: Sequence[int], context: int, affine: bool, **kw) -> list:
    layers = []
    for i in range(transforms):
        mask = alternating_mask(features, parity=i % 2)
        n_id, n_tr = int(mask.sum()), int((~mask).sum())
        net = MLP(n_id, (2 if affine else 1) * n_tr, tuple(hidden), context, act="relu", zero_init=True)
        layers.append(AffineCoupling(mask, net, **kw) if affine else AdditiveCoupling(mask, net))
    return layers


def realnvp(
    features: int,
    transforms: int = 8,
    hidden: Sequence[int] = (64, 64),
    context_features: int = 0,
    scale: str = "tanh",
    actnorm: bool = True,
) -> FlowModel:
    """RealNVP: affine couplings on alternating masks (with ActNorm between them by default)."""
    layers: list[Flow] = []
    for c in _coupling_stack(features, transforms, hidden, context_features, True, scale=scale):
        layers += [ActNorm(features), c] if actnorm else [c]
    return FlowModel(Sequential(layers), StandardNormal(features))


def nice(features: int, transforms: int = 4, hidden: Sequence[int] = (64, 64), context_features: int = 0) -> FlowModel:
    """NICE: additive couplings followed by a diagonal scaling layer."""
    layers = _coupling_stack(features, transforms, hidden, context_features, False)
    return FlowModel(Sequential(*layers, ElementwiseAffine(features)), StandardNormal(features))


def _autoregressive(features, transforms, hidden, context_features, mode, permutation) -> FlowModel:
    layers: list[Flow] = []
    for i in range(transforms):
        layers.append(MaskedAffineAutoregressive(features, tuple(hidden), context_features, mode=mode))
        if i < transforms - 1:
            layers.append(Reverse(features) if permutation == "reverse" else RandomPermutation(features, seed=i))
    return FlowModel(Sequential(layers), StandardNormal(features))


def maf(
    features: int,
    transforms: int = 5,
    hidden: Sequence[int] = (64, 64),
    context_features: int = 0,
    permutation: str = "reverse",
) -> FlowModel:
    """MAF: fast density (one MADE pass per layer), sampling one pass per feature."""
    return _autoregressive(features, transforms, hidden, context_features, "maf", permutation)


def iaf(
    features: int,
    transforms: int = 5,
    hidden: Sequence[int] = (64, 64),
    context_features: int = 0,
    permutation: str = "reverse",
) -> FlowModel:
    """IAF: fast sampling, density one pass per feature."""
    return _autoregressive(features, transforms, hidden, context_features, "iaf", permutation)


def glow_like(
    features: int, transforms: int = 8, hidden: Sequence[int] = (64, 64), context_features: int = 0
) -> FlowModel:
    """Glow's step on vectors: ActNorm, LU-decomposed invertible linear map, affine coupling."""
    layers: list[Flow] = []
    for i, c in enumerate(_coupling_stack(features, transforms, hidden, context_features, True, scale="tanh")):
        layers += [ActNorm(features), InvConv1x1(features, seed=i), c]
    return FlowModel(Sequential(layers), StandardNormal(features))


def cnf(
    features: int,
    blocks: int = 1,
    hidden: Sequence[int] = (64, 64),
    context_features: int = 0,
    act: str = "tanh",
    trace: str = "exact",
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    adjoint: bool = True,
    end_time: float = 0.5,
    kinetic_energy: float = 0.0,
    jacobian_norm: float = 0.0,
) -> FlowModel:
    """FFJORD: ``blocks`` CNFs with ConcatSquash dynamics and learned end times."""
    layers = cnf_stack(
        features, hidden, context_features, blocks, act, trace=trace, solver=solver, atol=atol, rtol=rtol,
        adjoint=adjoint, end_time=end_time, kinetic_energy=kinetic_energy, jacobian_norm=jacobian_norm,
    )  # fmt: skip
    return FlowModel(layers, StandardNormal(features))


def cnf_stack(
    features: int, hidden: Sequence[int], context_features: int = 0, blocks: int = 1, act: str = "tanh", **cnf_kwargs
) -> Sequential:
    """``blocks`` CNFs with ConcatSquash dynamics ``features -> hidden -> features`` (context and time enter every
    layer); ``cnf_kwargs`` go to :class:`core.flows.CNF` (trace, solver, tolerances, adjoint, end time, ...)."""
    return Sequential(
        [CNF(ConcatSquashMLP(features, tuple(hidden), context_features, act), **cnf_kwargs) for _ in range(blocks)]
    )


def glow(
    shape: Sequence[int],
    levels: int = 3,
    steps: int = 8,
    hidden: int = 128,
    blocks: int = 1,
    context_channels: int = 0,
    learned_prior: bool = True,
    coupling: str = "affine",
) -> FlowModel:
    """Multi-scale Glow on images (C, H, W): per level squeeze, ``steps`` Glow steps, and (but at the last
    level) a split that factors half the channels out, with a learned conditional prior as Glow.
    ``coupling``: ``"affine"`` or ``"additive"`` couplings in every step."""
    c, h, w = shape
    if h % 2**levels or w % 2**levels:
        raise ValueError(f"glow: height and width must be divisible by 2**levels = {2**levels}, got {tuple(shape)}")

    def level(channels: int, depth: int) -> Flow:
        sq = channels * 4
        body: list[Flow] = [Squeeze()]
        body += [
            GlowStep(sq, hidden, blocks, context_channels, seed=depth * 1000 + i, coupling=coupling)
            for i in range(steps)
        ]
        if depth < levels - 1:
            keep = sq - sq // 2
            prior = ConvNet(keep, 2 * (sq // 2), hidden, 1, context_channels) if learned_prior else None
            body.append(Split(level(keep, depth + 1), prior))
        body.append(Inverse(Squeeze()))
        return Sequential(body)

    return FlowModel(level(c, 0), StandardNormal(tuple(shape)))
