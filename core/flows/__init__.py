"""Invertible flows sharing one interface: ``forward(x, context) -> (z, logdet)`` and ``inverse``."""

from core.flows.affine import SCALE_BOUNDS, affine_forward, affine_inverse, bound_log_scale
from core.flows.autoregressive import MADE, MaskedAffineAutoregressive
from core.flows.base import Flow, Inverse, Sequential, sum_except_batch
from core.flows.conditional import ConditionalAffine, StackedConditionalAffine
from core.flows.continuous import CNF, regularization_loss
from core.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
)
from core.flows.dequantization import UniformDequantization, VariationalDequantization
from core.flows.elementwise import ActNorm, ElementwiseAffine, Logit, Permutation, RandomPermutation, Reverse
from core.flows.glow import GlowStep, InvConv1x1, Split, Squeeze

__all__ = [
    "Flow",
    "Sequential",
    "Inverse",
    "sum_except_batch",
    "SCALE_BOUNDS",
    "bound_log_scale",
    "affine_forward",
    "affine_inverse",
    "ElementwiseAffine",
    "ConditionalAffine",
    "StackedConditionalAffine",
    "Logit",
    "Permutation",
    "RandomPermutation",
    "Reverse",
    "ActNorm",
    "half_mask",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "AdditiveCoupling",
    "AffineCoupling",
    "InvConv1x1",
    "Squeeze",
    "Split",
    "GlowStep",
    "MADE",
    "MaskedAffineAutoregressive",
    "CNF",
    "regularization_loss",
    "UniformDequantization",
    "VariationalDequantization",
]
