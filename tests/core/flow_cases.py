"""The registry of every Flow the generic suite checks: one ``Case`` per layer configuration.

Apps register their layers in ``tests/apps/<app>/flow_cases.py`` as a list ``APP_CASES``; they are appended to
``CASES`` at import so that every layer in the code base goes through the same generic suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from core.flows import (
    CNF,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAffine,
    ElementwiseAffine,
    GlowStep,
    InvConv1x1,
    Inverse,
    Logit,
    MaskedAffineAutoregressive,
    Permutation,
    RandomPermutation,
    Reverse,
    Sequential,
    Split,
    Squeeze,
    UniformDequantization,
    VariationalDequantization,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
)
from core.nn import MLP, ConcatSquashMLP, ConvNet


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one sample, without batch
    context: tuple[int, ...] | None = None
    inputs: str = "normal"  # normal | unit (inside (0,1)) | integer (0..levels-1)
    jacobian: bool = True  # whether log-det equals the Jacobian log-det (not for stochastic bounds)
    inverse_jacobian: bool = True  # False where the inverse is piecewise constant (quantization)
    # a dequantization layer: log-det = -D log(levels) - log q(u|x), checked on the Jacobian of its noise
    dequantization: bool = False
    tol: float = 1e-8
    tags: set = field(default_factory=set)


def make_input(case: Case, batch: int, dtype=torch.float64) -> torch.Tensor:
    if case.inputs == "unit":
        return torch.rand(batch, *case.shape, dtype=dtype) * 0.9 + 0.05
    if case.inputs == "integer":
        return torch.randint(0, 16, (batch, *case.shape)).to(dtype)
    return torch.randn(batch, *case.shape, dtype=dtype)


def _cnf(context: int = 0, trace: str = "exact") -> CNF:
    dyn = ConcatSquashMLP(3, hidden=(16, 16), context_features=context)
    return CNF(dyn, trace=trace, solver="dopri5", atol=1e-10, rtol=1e-10, adjoint=False, end_time=0.5)


def _variational_dequantization(encoder: nn.Module | None = None) -> VariationalDequantization:
    # a noise flow that mixes the dimensions of eps (coupling) and depends on x (the context = encoder(x))
    cond = 4 if encoder is not None else 5
    noise_flow = Sequential(
        ConditionalAffine(5, cond, hidden=(8,)),
        AffineCoupling(half_mask(5), MLP(3, 4, (8,), context_features=cond)),
        Reverse(5),
        AffineCoupling(half_mask(5), MLP(3, 4, (8,), context_features=cond)),
    )
    return VariationalDequantization(noise_flow, levels=16, encoder=encoder)


_DEQUANTIZATION = dict(inputs="integer", jacobian=False, inverse_jacobian=False, dequantization=True)


def _glow_multiscale(context: int = 0) -> Sequential:
    # (2, 8, 8) -> squeeze (8, 4, 4) -> step -> split: (4, 4, 4) goes on, squeezed again, (4, 4, 4) leaves
    inner = Sequential(Squeeze(), GlowStep(16, hidden=8, context_channels=context, seed=1), Inverse(Squeeze()))
    prior = ConvNet(4, 8, hidden=8, blocks=1, context_channels=context, zero_init=False)
    return Sequential(
        Squeeze(), GlowStep(8, hidden=8, context_channels=context), Split(inner, prior), Inverse(Squeeze())
    )


CASES: list[Case] = [
    Case("elementwise_affine", lambda: ElementwiseAffine(5), (5,)),
    Case("conditional_affine", lambda: ConditionalAffine(4, 6, hidden=(16,)), (4,), context=(6,)),
    Case("logit", lambda: Logit(0.05), (5,), inputs="unit"),
    Case("random_permutation", lambda: RandomPermutation(5, seed=3), (5,)),
    Case("permutation_channels", lambda: Permutation(torch.tensor([2, 0, 3, 1]), dim=1), (4, 2, 3)),
    Case("reverse_channels", lambda: Reverse(3), (3, 4, 4)),
    Case("actnorm_vector", lambda: ActNorm(5), (5,)),
    Case("actnorm_image", lambda: ActNorm(3), (3, 4, 4)),
    Case("additive_coupling_half", lambda: AdditiveCoupling(half_mask(5), MLP(3, 2, (16,))), (5,)),
    Case(
        "additive_coupling_checkerboard",
        lambda: AdditiveCoupling(checkerboard_mask(4, 4), ConvNet(2, 2, hidden=8, blocks=1, zero_init=False)),
        (2, 4, 4),
    ),
    Case("affine_coupling_alternating", lambda: AffineCoupling(alternating_mask(5), MLP(3, 4, (16,))), (5,)),
    Case(
        "affine_coupling_conditional",
        lambda: AffineCoupling(half_mask(4, first=False), MLP(2, 4, (16,), context_features=3)),
        (4,),
        context=(3,),
    ),
    Case(
        "affine_coupling_checkerboard_sigmoid",
        lambda: AffineCoupling(
            checkerboard_mask(4, 4, parity=1), ConvNet(2, 4, hidden=8, blocks=1, zero_init=False), scale="sigmoid"
        ),
        (2, 4, 4),
    ),
    Case(
        "affine_coupling_channel_conditional",
        lambda: AffineCoupling(channel_mask(4), ConvNet(2, 4, hidden=8, blocks=1, context_channels=2, zero_init=False)),
        (4, 4, 4),
        context=(2,),
    ),
    Case(
        "affine_coupling_sequence_checkerboard",
        lambda: AffineCoupling(checkerboard_mask(6), _Conv1d(2, 4)),
        (2, 6),
    ),
    Case("invconv_vector", lambda: InvConv1x1(5), (5,)),
    Case("invconv_image", lambda: InvConv1x1(4, seed=2), (4, 3, 3)),
    Case("squeeze", lambda: Squeeze(), (2, 4, 4)),
    Case("unsqueeze", lambda: Inverse(Squeeze()), (8, 2, 2)),
    Case("glow_step", lambda: GlowStep(4, hidden=8), (4, 4, 4)),
    Case("glow_step_additive", lambda: GlowStep(4, hidden=8, coupling="additive"), (4, 4, 4)),
    Case("glow_step_conditional", lambda: GlowStep(4, hidden=8, context_channels=3), (4, 4, 4), context=(3,)),
    Case("glow_multiscale_split", lambda: _glow_multiscale(), (2, 8, 8)),
    Case("glow_multiscale_split_conditional", lambda: _glow_multiscale(2), (2, 8, 8), context=(2,)),
    Case("maf", lambda: MaskedAffineAutoregressive(5, (16, 16)), (5,)),
    Case("maf_random_order", lambda: MaskedAffineAutoregressive(5, (16,), order=[3, 0, 4, 1, 2]), (5,)),
    Case("maf_conditional", lambda: MaskedAffineAutoregressive(4, (16,), context_features=2), (4,), context=(2,)),
    Case("iaf", lambda: MaskedAffineAutoregressive(5, (16, 16), mode="iaf", order="reverse"), (5,)),
    Case(
        "iaf_conditional",
        lambda: MaskedAffineAutoregressive(4, (16,), context_features=2, mode="iaf"),
        (4,),
        context=(2,),
    ),
    Case("cnf_exact", lambda: _cnf(), (3,), tol=1e-6),
    Case("cnf_exact_conditional", lambda: _cnf(context=2), (3,), context=(2,), tol=1e-6),
    Case("cnf_points", lambda: _cnf(context=2), (4, 3), context=(2,), tol=1e-6),
    Case("uniform_dequantization", lambda: UniformDequantization(16), (5,), **_DEQUANTIZATION),
    Case("variational_dequantization", lambda: _variational_dequantization(), (5,), **_DEQUANTIZATION),
    Case(
        "variational_dequantization_encoder",
        lambda: _variational_dequantization(encoder=MLP(5, 4, (8,))),
        (5,),
        **_DEQUANTIZATION,
    ),
]


class _Conv1d(nn.Module):
    """A tiny 1-D conv conditioner for sequence couplings (B, C, L)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(cin, 8, 3, padding=1), nn.Tanh(), nn.Conv1d(8, cout, 3, padding=1))

    def forward(self, x, context=None):
        return self.net(x)


def _app_cases() -> list[Case]:
    """``APP_CASES`` from every ``tests/apps/<app>/flow_cases.py``, names prefixed with the app."""
    import importlib
    from pathlib import Path

    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "apps").glob("*/flow_cases.py")):
        module = importlib.import_module(f"tests.apps.{path.parent.name}.flow_cases")
        for case in module.APP_CASES:
            case.name = f"{path.parent.name}/{case.name}"
            found.append(case)
    return found


CASES += _app_cases()
