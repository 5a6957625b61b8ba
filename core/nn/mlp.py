"""Fully connected conditioners."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "activation"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """An activation module by name (relu, elu, gelu, silu, tanh, softplus, leaky_relu)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLP(nn.Module):
    """``x -> out`` through hidden layers; ``context`` (B, context_features) is concatenated to the input.

    With ``zero_init`` the last layer starts at zero, so a coupling layer built on it starts as the identity.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        act: str = "relu",
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.context_features = context_features
        sizes = [in_features + context_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), activation(act)]
        last = nn.Linear(sizes[-1], out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features:
            if context is None:
                raise ValueError(f"MLP was built with context_features={self.context_features} but got no context")
            x = torch.cat([x, context.reshape(x.shape[0], -1)], dim=-1)
        return self.net(x)
