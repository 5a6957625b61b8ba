"""The shared affine element map and its named log-scale bounds (core.flows.affine), in float64."""

from __future__ import annotations

import pytest
import torch

from core.flows import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAffine,
    MaskedAffineAutoregressive,
    Sequential,
    Split,
    StackedConditionalAffine,
    half_mask,
)
from core.flows.affine import SCALE_BOUNDS, affine_forward, affine_inverse, bound_log_scale
from core.nn import MLP


@pytest.fixture(autouse=True)
def _float64():
    """Layers built inside a test get float64 parameters; the default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _map(scale: str, bound: float = 2.0):
    """A 4-D element map x -> y with fixed shift and raw log-scale, large enough for the bounds to matter."""
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(4, generator=g, dtype=torch.float64)
    raw = 4.0 * torch.randn(4, generator=g, dtype=torch.float64)
    return shift, bound_log_scale(raw, scale, bound)


@pytest.mark.parametrize("scale", SCALE_BOUNDS)
def test_round_trip_and_opposite_log_dets(scale: str):
    shift, log_scale = _map(scale)
    x = torch.randn(3, 4, dtype=torch.float64)
    y, ld = affine_forward(x, shift, log_scale)
    x_rec, ld_inv = affine_inverse(y, shift, log_scale)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=0)
    assert ld.shape == log_scale.shape  # element-wise: callers sum over the dims they need


@pytest.mark.parametrize("scale", SCALE_BOUNDS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_log_det_equals_autograd_jacobian(scale: str, direction: str):
    shift, log_scale = _map(scale)
    fn = affine_forward if direction == "forward" else affine_inverse
    x = torch.randn(4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v, shift, log_scale)[0], x)
    _, logabsdet = torch.linalg.slogdet(jac)
    torch.testing.assert_close(fn(x, shift, log_scale)[1].sum(), logabsdet, rtol=0, atol=1e-12)


def test_bounds_values():
    raw = torch.linspace(-50, 50, 101, dtype=torch.float64)
    torch.testing.assert_close(bound_log_scale(raw, "none"), raw)
    assert bound_log_scale(raw, "tanh", 1.5).abs().max() <= 1.5
    small = torch.tensor([1e-4, -1e-4], dtype=torch.float64)
    torch.testing.assert_close(bound_log_scale(small, "tanh", 3.0), small, rtol=1e-8, atol=0)  # identity near 0
    sig = bound_log_scale(raw, "sigmoid")
    assert (sig < 0).all()  # scales in (0, 1), as Glow
    torch.testing.assert_close(sig.exp(), torch.sigmoid(raw + 2.0))


def test_unknown_bound_names_the_choices():
    with pytest.raises(ValueError, match="none, tanh, sigmoid"):
        bound_log_scale(torch.zeros(2), "exp")
    for build in (
        lambda: AffineCoupling(half_mask(4), MLP(2, 4), scale="softplus"),
        lambda: MaskedAffineAutoregressive(3, (8,), scale="clamp"),
        lambda: ConditionalAffine(3, 2, scale="exp"),
        lambda: Split(AffineCoupling(half_mask(2), MLP(1, 2)), MLP(2, 2), scale="relu"),
    ):
        with pytest.raises(ValueError, match="unknown scale bound"):
            build()
    with pytest.raises(ValueError, match="positive"):
        ConditionalAffine(3, 2, bound=0.0)


@pytest.mark.parametrize("scale", SCALE_BOUNDS)
def test_layers_take_the_named_bound(scale: str):
    """Every bound works through a layer: invertible, and log-dets of both directions cancel."""
    torch.manual_seed(0)
    layers = [
        (AffineCoupling(half_mask(4), MLP(2, 4, (8,), zero_init=False), scale=scale, bound=1.0), None),
        (MaskedAffineAutoregressive(4, (8,), scale=scale, bound=1.0), None),
        (ConditionalAffine(4, 3, (8,), bound=1.0, scale=scale), torch.randn(5, 3)),
    ]
    for layer, context in layers:
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.5 * torch.randn_like(p))
        x = torch.randn(5, 4)
        z, ld = layer(x, context)
        x_rec, ld_inv = layer.inverse(z, context)
        torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-10)
        torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)


@pytest.mark.parametrize("hidden", [(16,), (16, 8)])
@pytest.mark.parametrize("scale", ["tanh", "none"])
def test_stacked_conditional_affine_is_the_sequential_inverse(hidden: tuple, scale: str):
    """GraphAF's sampler evaluates all K conditioners in one batched pass: same parameters, same inverse."""
    torch.manual_seed(0)
    layers = [ConditionalAffine(4, 10, hidden, act="tanh", scale=scale) for _ in range(5)]
    for layer in layers:  # away from the zero (identity) initialisation
        for w in layer.parameters():
            torch.nn.init.normal_(w, std=0.5)
    c, z = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    layers = [layer.double() for layer in layers]
    stacked = StackedConditionalAffine(layers)
    shift, log_scale = stacked.params(c)
    assert shift.shape == log_scale.shape == (7, 5, 4)
    for k, layer in enumerate(layers):
        t, s = layer._params(c)
        torch.testing.assert_close(shift[:, k], t)
        torch.testing.assert_close(log_scale[:, k], s)
    with torch.no_grad():
        torch.testing.assert_close(stacked.inverse(z, shift, log_scale), Sequential(layers).inverse(z, c)[0])


class _Float32Params(torch.nn.Module):
    """A conditioner whose output is float32 whatever its input: what autocast does to a coupling's scale, whose
    exp runs in float32 while the flow's state arrives in bfloat16."""

    def __init__(self, features_in: int, features_out: int) -> None:
        super().__init__()
        self.net = MLP(features_in, features_out, hidden=(8,)).float()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x.float())


@pytest.mark.parametrize("layer_cls", [AffineCoupling, AdditiveCoupling])
def test_coupling_of_a_half_precision_state_with_float32_parameters_widens_it(layer_cls):
    torch.manual_seed(0)
    n_params = 2 if layer_cls is AffineCoupling else 1
    layer = layer_cls(half_mask(4), _Float32Params(2, 2 * n_params))
    x16 = torch.randn(5, 4).bfloat16()
    z, logdet = layer(x16)  # bf16 state, float32 parameters: index_copy needs one dtype
    assert z.dtype == torch.float32
    z32, logdet32 = layer(x16.float())  # the same values in float32 give the same result
    torch.testing.assert_close(z, z32)
    torch.testing.assert_close(logdet.float(), logdet32)  # (additive: zeros in the state's dtype)
    x_back, _ = layer.inverse(z)
    torch.testing.assert_close(x_back, x16.float(), rtol=1e-5, atol=1e-5)
