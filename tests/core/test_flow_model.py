"""FlowModel-level properties over every preset: normalisation, sampling, gradients, save/load."""

from __future__ import annotations

import io

import pytest
import torch

from core import presets
from core.distributions import DiagonalGaussian, FlowModel, StandardNormal
from core.nn import MLP

PRESETS = ["realnvp", "nice", "maf", "iaf", "glow_like", "cnf"]


def build(name: str, perturb: float = 0.1) -> FlowModel:
    kw = dict(transforms=4, hidden=(32, 32)) if name != "cnf" else dict(hidden=(32, 32), atol=1e-6, rtol=1e-6)
    model = getattr(presets, name)(2, **kw)
    model.train()
    model.log_prob(torch.randn(256, 2))  # ActNorm data-dependent initialisation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def grid_mass(model: FlowModel, lim: float = 7.0, n: int = 250) -> float:
    xs = torch.linspace(-lim, lim, n)
    pts = torch.cartesian_prod(xs, xs)
    with torch.no_grad():
        p = torch.cat([model.log_prob(c).exp() for c in pts.split(20000)])
    return float(p.sum() * (xs[1] - xs[0]) ** 2)


@pytest.mark.parametrize("name", PRESETS)
def test_untrained_density_integrates_to_one(name):
    assert grid_mass(build(name)) == pytest.approx(1.0, abs=0.02)


def test_trained_density_integrates_to_one():
    from apps.density2d.data import sample_toy

    model = build("realnvp", perturb=0.0).train()
    data = torch.from_numpy(sample_toy("moons", 4096, seed=1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (256,))]
        loss = -model.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert -model.log_prob(data).mean() < 3.0, "training should have fitted the moons at least roughly"
    assert grid_mass(model) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", PRESETS)
def test_sample_shapes_temperature_and_log_prob(name):
    model = build(name)
    torch.manual_seed(1)
    x, logp = model.sample_with_log_prob(64)
    assert x.shape == (64, 2) and logp.shape == (64,)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), logp, atol=1e-3, rtol=1e-3)
    # temperature scales the base noise: sampling at T equals inverting T * z for the same z
    torch.manual_seed(2)
    hot = model.sample(16, temperature=0.5)
    torch.manual_seed(2)
    z = model.base.sample(16)
    torch.testing.assert_close(hot, model.transform.inverse(0.5 * z)[0], atol=1e-4, rtol=1e-4)
    cold = model.sample(4, temperature=0.0)
    torch.testing.assert_close(cold, cold[:1].expand(4, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    (-model.log_prob(torch.randn(32, 2)).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: no gradient for {missing}"


@pytest.mark.parametrize("name", PRESETS)
def test_save_load_round_trip(name):
    model = build(name)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = getattr(presets, name)(
        2, **(dict(transforms=4, hidden=(32, 32)) if name != "cnf" else dict(hidden=(32, 32), atol=1e-6, rtol=1e-6))
    )
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    x = torch.randn(16, 2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x), atol=0, rtol=0)


def test_base_distributions_match_torch():
    z = torch.randn(10, 3)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(StandardNormal(3).log_prob(z), ref)
    net = MLP(2, 6, (8,))
    c = torch.randn(10, 2)
    dg = DiagonalGaussian(3, net)
    mean, log_scale = net(c).reshape(10, 2, 3).unbind(1)
    ref = torch.distributions.Normal(mean, log_scale.exp()).log_prob(z).sum(1)
    torch.testing.assert_close(dg.log_prob(z, c), ref)
    assert dg.sample(context=c).shape == (10, 3)
    with pytest.raises(ValueError, match="batch size"):
        dg.sample(5, context=c)


def test_conditional_model_depends_on_context():
    model = presets.maf(3, transforms=2, hidden=(16,), context_features=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(8, 3), torch.randn(8, 2)
    assert not torch.allclose(model.log_prob(x, c), model.log_prob(x, c + 1.0))
    assert model.sample(context=c).shape == (8, 3)
