"""Layer-specific properties the generic suite cannot see."""

from __future__ import annotations

import math

import pytest
import torch

from core.distributions import FlowModel, StandardNormal
from core.flows import (
    MADE,
    ActNorm,
    InvConv1x1,
    Sequential,
    Split,
    Squeeze,
    UniformDequantization,
    VariationalDequantization,
    checkerboard_mask,
)
from core.flows.elementwise import ElementwiseAffine
from core.metrics import bits_per_dim_to_nats, nats_to_bits_per_dim
from core.nn import ConcatSquashLinear, ConvNet
from core.presets import maf


@pytest.mark.parametrize("order", [None, "reverse", [2, 0, 4, 1, 3]])
@pytest.mark.parametrize("hidden", [(8,), (16, 7)])
def test_made_is_autoregressive(order, hidden):
    made = MADE(5, hidden, num_params=2, context_features=2, order=order, act="tanh", zero_init=False).double()
    x, c = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: made(t, c), x)[0, :, :, 0, :]  # (params, out, in)
    deg = made.degrees
    allowed = deg[None, :] < deg[:, None]  # output i may see input j iff deg j < deg i
    assert (jac.abs().sum(0)[~allowed] == 0).all(), "an output depends on a later or equal input"
    assert (jac.abs().sum(0)[allowed] > 0).all(), "an allowed connection is missing (mask too strict)"


def test_maf_sampling_is_exact_not_approximate():
    model = maf(4, transforms=3, hidden=(16,)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    z = torch.randn(64, 4, dtype=torch.float64)
    x, _ = model.transform.inverse(z)
    z2, _ = model.transform(x)
    assert (z2 - z).abs().max() < 1e-10


def test_squeeze_is_space_to_depth():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    # channel k holds the pixels at offset (k // 2, k % 2) of every 2x2 block
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="divisible"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


def test_invconv_logdet_is_log_det_of_weight():
    layer = InvConv1x1(6, seed=4)
    with torch.no_grad():
        layer.log_s.add_(0.3)
        layer.upper.add_(0.1)
    _, logabs = torch.linalg.slogdet(layer.weight())
    x = torch.randn(2, 6, 3, 5)
    _, logdet = layer(x)
    torch.testing.assert_close(logdet, logabs.expand(2) * 15, rtol=1e-4, atol=1e-4)


def test_inverse_is_not_cached_across_updates():
    layer = InvConv1x1(4)
    x = torch.randn(3, 4)
    z, _ = layer(x)
    with torch.no_grad():
        layer.lower.add_(0.5)
    z2, _ = layer(x)
    torch.testing.assert_close(layer.inverse(z2)[0], x, atol=1e-5, rtol=0)


def test_actnorm_data_dependent_init():
    layer = ActNorm(3)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([2.0, 0.5, 3.0])[None, :, None, None] + 4.0
    z, _ = layer(x)
    dims = (0, 2, 3)
    torch.testing.assert_close(z.mean(dims), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dims, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    z2, _ = layer(x + 1.0)  # initialised once only
    torch.testing.assert_close(z2 - z, (1.0 / layer.log_std.exp())[None, :, None, None].expand_as(z), atol=1e-5, rtol=0)


def test_split_with_prior_is_conditional_gaussian():
    prior = ConvNet(2, 4, hidden=8, blocks=1, zero_init=False)
    model = FlowModel(Split(ElementwiseAffine((2, 4, 4)), prior), StandardNormal((4, 4, 4)))
    with torch.no_grad():
        model.transform.inner.log_scale.normal_(0, 0.3)
    x = torch.randn(5, 4, 4, 4)
    x1, x2 = x[:, :2], x[:, 2:]
    mean, raw = prior(x1).chunk(2, 1)
    log_sigma = 3 * torch.tanh(raw / 3)
    z1, ld1 = model.transform.inner(x1)
    normal = torch.distributions.Normal
    expected = (
        normal(0, 1).log_prob(z1).sum((1, 2, 3)) + ld1 + normal(mean, log_sigma.exp()).log_prob(x2).sum((1, 2, 3))
    )
    torch.testing.assert_close(model.log_prob(x), expected, atol=1e-4, rtol=1e-5)


def test_checkerboard_mask_alternates():
    m = checkerboard_mask(2, 3)
    assert m.shape == (1, 2, 3)
    assert m[0].tolist() == [[True, False, True], [False, True, False]]


def test_bits_per_dim_conversions():
    assert nats_to_bits_per_dim(math.log(2) * 10, 10) == pytest.approx(1.0)
    assert bits_per_dim_to_nats(nats_to_bits_per_dim(3.7, 5), 5) == pytest.approx(3.7)


def test_uniform_dequantization_bound_on_uniform_model_is_exact():
    deq = UniformDequantization(256).train()
    x = torch.randint(0, 256, (100, 3, 4, 4)).float()
    y, logdet = deq(x)
    assert ((y >= 0) & (y < 1)).all()
    assert torch.equal(deq.inverse(y)[0], x)
    # log p_uniform(y) = 0, so -logdet / (D ln 2) is the model's bits/dim: exactly 8
    assert nats_to_bits_per_dim(-logdet, 48).sub(8.0).abs().max() < 1e-5


def test_uniform_dequantization_draws_noise_in_eval_and_centres_only_when_asked():
    """A likelihood reported in eval mode must still be the dequantization bound (bin centres are no bound)."""
    deq = UniformDequantization(4).eval()
    x = torch.randint(0, 4, (2000, 3)).double()
    y, _ = deq(x)
    u = y * 4 - x
    assert 0 <= u.min() and u.max() < 1 and u.std() > 0.25, "eval mode must draw uniform noise"
    with deq.centered():
        y_c, _ = deq(x)
    torch.testing.assert_close(y_c, (x + 0.5) / 4)
    assert not deq.center, "centered() restores the noisy setting"


def test_variational_dequantization_is_a_normalised_bound():
    noise_flow = Sequential(ElementwiseAffine(1))
    with torch.no_grad():
        noise_flow[0].log_scale.fill_(-0.5)
        noise_flow[0].shift.fill_(0.7)
    deq = VariationalDequantization(noise_flow, levels=4)
    x = torch.full((200000, 1), 2.0)
    y, logdet = deq(x)
    assert torch.equal(deq.inverse(y)[0], x)
    log_q = -logdet - math.log(4)  # logdet = -log(levels) - log q
    # q is a density on [0, 1): E_q[1 / q(u)] = length of [0, 1) = 1
    assert torch.exp(-log_q).mean().item() == pytest.approx(1.0, abs=0.02)
    # and with a uniform model p(y) the bound is below the true log P(x) = -log 4 (Jensen: entropy <= 0)
    assert logdet.mean().item() < -math.log(4)


def test_concat_squash_point_sets_fold_gate_and_shift_into_one_product_per_set():
    """The folded (B, N, in) path is the per-point formula ``(W x + b) * sigmoid(G c + g) + H c``, values and
    gradients (float64), including the gradient of a gradient that the Hutchinson trace needs in training."""
    torch.manual_seed(0)
    layer = ConcatSquashLinear(5, 7, 3).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    per_point = layer(x.reshape(24, 5), c.repeat_interleave(6, dim=0)).reshape(4, 6, 7)  # the unfolded path
    folded = layer(x, c)
    torch.testing.assert_close(folded, per_point, rtol=1e-12, atol=1e-12)
    e = torch.randn_like(folded)
    inputs = (x, c, *layer.parameters())

    def second_order_grads(out):
        (vjp,) = torch.autograd.grad(torch.tanh(out), x, e, create_graph=True)
        return torch.autograd.grad((vjp * x).sum(), inputs)

    for a, b in zip(second_order_grads(folded), second_order_grads(per_point)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
