"""Bits per dimension of discrete data: the dequantization layer's -D log(levels) is counted once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.distributions import FlowModel
from core.flows import UniformDequantization
from core.metrics import discrete_bits_per_dim


class _UnitUniform(nn.Module):
    """The uniform density on [0, 1)^D: log p = 0 inside."""

    def log_prob(self, z: torch.Tensor, context=None) -> torch.Tensor:
        assert ((z >= 0) & (z < 1)).all()
        return z.new_zeros(z.shape[0])


@pytest.mark.parametrize("shape", [(12,), (3, 4, 4)])
def test_numerics_uniform_8bit_model_is_8_bits_per_dim(shape):
    model = FlowModel(UniformDequantization(256), _UnitUniform())
    x = torch.randint(0, 256, (64, *shape)).float()
    nll = -model.log_prob(x).mean()  # -log P(x) in nats: the dequantization layer holds -D log 256
    assert discrete_bits_per_dim(nll, x[0].numel()) == pytest.approx(8.0)


def test_numerics_discrete_bits_per_dim_takes_no_scale():
    """The old third argument (the scale) added D log(levels) a second time: a call with it must fail loudly."""
    with pytest.raises(TypeError):
        discrete_bits_per_dim(0.0, 12, 256)
