"""Conditioner networks: they parameterise flows and never need to be invertible themselves."""

from core.nn.concat_squash import ConcatSquashLinear, ConcatSquashMLP
from core.nn.conv import ConvNet
from core.nn.mlp import MLP, activation

__all__ = ["MLP", "ConvNet", "ConcatSquashLinear", "ConcatSquashMLP", "activation"]
