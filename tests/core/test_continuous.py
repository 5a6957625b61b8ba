"""CNF-specific checks: unbiased Hutchinson trace, adjoint == direct gradients, regularisers, errors."""

from __future__ import annotations

import pytest
import torch

from core.flows import CNF, regularization_loss
from core.flows.continuous import divergence_exact, divergence_hutchinson, hutchinson_noise
from core.nn import ConcatSquashMLP


def dynamics(features=4, context=0):
    torch.manual_seed(3)
    f = ConcatSquashMLP(features, (32, 32), context).double()
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(2.0)
    return f


class _Expanding(torch.nn.Module):
    """``f(t, x) + 2 x``: a trace of about 2 D, so that a relative bias of a few percent is measurable."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, t, x, context=None):
        return self.f(t, x, context) + 2.0 * x


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    f = _Expanding(dynamics())
    x0 = torch.randn(1, 4, dtype=torch.float64)
    x = x0.expand(100000, 4).clone().requires_grad_(True)
    t = torch.tensor(0.3, dtype=torch.float64)
    dx = f(t, x)
    x1 = x0.clone().requires_grad_(True)
    exact = divergence_exact(f(t, x1), x1, create_graph=False)[0]
    est, _ = divergence_hutchinson(dx, x, hutchinson_noise(x, noise), create_graph=False)
    stderr = est.std() / est.numel() ** 0.5
    assert exact.abs() > 5
    # within 4 standard errors of the exact trace; the error bar is small enough that a 2 % bias fails
    assert abs(est.mean() - exact) < 4 * stderr + 1e-12
    assert 4 * stderr < 0.02 * exact.abs()


def test_cnf_hutchinson_logdet_is_unbiased_over_solves():
    f = _Expanding(dynamics(3))
    exact = CNF(f, trace="exact", solver="rk4", step_size=0.05, adjoint=False, end_time=0.5).double()
    hutch = CNF(f, trace="hutchinson", solver="rk4", step_size=0.05, adjoint=False, end_time=0.5).double()
    x = torch.randn(1, 3, dtype=torch.float64).expand(4000, 3).clone()
    with torch.no_grad():
        _, ld_exact = exact(x[:1])
        z, ld = hutch(x)
        z_exact, _ = exact(x[:1])
    torch.testing.assert_close(z[:1], z_exact)  # the noise changes the trace only, never the path
    stderr = ld.std() / ld.numel() ** 0.5
    assert abs(ld.mean() - ld_exact[0]) < 4 * stderr + 1e-9
    assert 4 * stderr < 0.02 * ld_exact[0].abs()


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradients_match_direct_backprop(trace):
    """The adjoint pass must see the same dynamics as the forward solve: same context, same Hutchinson noise."""
    f = dynamics(3, context=2)
    grads = []
    for adjoint in (False, True):
        cnf = CNF(f, trace=trace, atol=1e-10, rtol=1e-10, adjoint=adjoint, end_time=0.7).double()
        torch.manual_seed(0)
        x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64).requires_grad_(True)
        z, logdet = cnf(x, c)
        cnf.inverse(z.detach(), c)  # a second solve before backward must not disturb the first one's gradient
        (z.square().sum() - logdet.sum()).backward()
        grads.append([p.grad.clone() for p in cnf.parameters()] + [c.grad.clone()])
        f.zero_grad()
    for g_direct, g_adjoint in zip(*grads):
        torch.testing.assert_close(g_adjoint, g_direct, atol=1e-6, rtol=1e-5)


def test_regularisers_are_computed_in_training_only():
    f = dynamics(2)
    cnf = CNF(f, trace="hutchinson", kinetic_energy=0.1, jacobian_norm=0.2, solver="rk4", step_size=0.1).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    cnf.train()
    cnf(x)
    reg = regularization_loss(cnf)
    assert reg is not None and reg.item() > 0 and reg.requires_grad
    assert set(cnf.regularization) == {"kinetic_energy", "jacobian_norm"}
    cnf.eval()
    with torch.no_grad():
        cnf(x)
    assert regularization_loss(cnf) is None


def test_kinetic_energy_of_constant_velocity_field():
    class Constant(torch.nn.Module):
        pointwise = False

        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))

        def forward(self, t, x, context=None):
            return self.v.expand_as(x)

    cnf = (
        CNF(
            Constant(),
            trace="exact",
            kinetic_energy=1.0,
            solver="rk4",
            step_size=0.1,
            end_time=2.0,
            train_end_time=False,
            adjoint=False,
        )
        .double()
        .train()
    )
    x = torch.zeros(4, 2, dtype=torch.float64)
    z, logdet = cnf(x)
    torch.testing.assert_close(z, torch.tensor([[6.0, 8.0]] * 4, dtype=torch.float64))
    torch.testing.assert_close(logdet, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(cnf.regularization["kinetic_energy"], torch.full((4,), 50.0, dtype=torch.float64))


def test_inference_mode_gives_a_clear_error():
    cnf = CNF(dynamics(2).float())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        cnf(torch.randn(2, 2))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="trace"):
        CNF(dynamics(2), trace="approximate")
    with pytest.raises(ValueError, match="noise"):
        CNF(dynamics(2), noise="uniform")


@pytest.mark.parametrize("adjoint", [False, True])
def test_no_logdet_integrates_the_same_state_without_the_trace(adjoint):
    """Under no_logdet a CNF solves x alone (fewer function evaluations, each without the trace's backward pass):
    the same points to the tolerance, a NaN log-det, and gradients still flow when grad mode is on."""
    from core.flows.continuous import no_logdet

    cnf = CNF(dynamics(3, 2), trace="exact", atol=1e-8, rtol=1e-8, adjoint=adjoint).double()
    z = torch.randn(5, 7, 3, dtype=torch.float64)
    ctx = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        x_full, ld = cnf.inverse(z, ctx)
        with no_logdet():
            x_fast, ld_fast = cnf.inverse(z, ctx)
        x_after, ld_after = cnf.inverse(z, ctx)  # the switch ends with the block
    torch.testing.assert_close(x_fast, x_full, atol=1e-6, rtol=1e-6)
    assert ld_fast.shape == ld.shape == (5,) and ld_fast.isnan().all() and torch.isfinite(ld).all()
    # (a later solve starts from the earlier one's step size: the same points to the tolerance, not bit for bit)
    torch.testing.assert_close(x_after, x_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ld_after, ld, atol=1e-6, rtol=1e-6)
    with no_logdet():
        x, _ = cnf.inverse(z.requires_grad_(True), ctx)
    x.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and cnf.sqrt_end_time.grad is not None


def _train_step_evals(cnf, x, c):
    """(forward evaluations, backward evaluations, z) of one training-mode solve and its adjoint backward."""
    cnf.func.num_evals = 0
    z, logdet = cnf(x, c)
    fwd = cnf.func.num_evals
    (z.square().sum() - logdet.sum()).backward()
    return fwd, cnf.func.num_evals - fwd, z.detach()


def test_warm_start_saves_the_ramp_up_at_the_same_tolerance():
    """A second training solve starts at the first one's largest accepted step: fewer evaluations forward and in
    the adjoint backward, the same result to the tolerance; without warm start, the same steps and bits."""
    f = dynamics(3, context=2)
    x, c = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    warm = CNF(f, trace="exact", atol=1e-6, rtol=1e-6, end_time=0.7).double()
    first, second = _train_step_evals(warm, x, c), _train_step_evals(warm, x, c)
    assert second[0] < first[0] and second[1] < first[1], (first[:2], second[:2])
    torch.testing.assert_close(second[2], first[2], atol=1e-4, rtol=1e-4)
    assert set(warm.first_steps) == {"forward", "adjoint"} and 0 < warm.first_steps["forward"] <= 0.7 + 1e-9

    cold = CNF(f, trace="exact", atol=1e-6, rtol=1e-6, end_time=0.7, warm_start=False).double()
    a, b = _train_step_evals(cold, x, c), _train_step_evals(cold, x, c)
    assert a[:2] == b[:2] == first[:2] and torch.equal(a[2], b[2])  # cold: every solve as the first warm one
    torch.testing.assert_close(a[2], first[2], atol=0, rtol=0)


def test_warm_start_is_capped_at_the_interval_and_off_in_evaluation():
    f = dynamics(3)
    cnf = CNF(f, trace="exact", end_time=0.5).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    cnf(x)
    cnf.first_steps["forward"] = 10.0  # larger than the interval
    assert cnf._solver_kwargs("forward")["options"]["first_step"] == pytest.approx(0.5)
    cnf.eval()  # evaluation: torchdiffeq's own initial step, whatever ran before
    assert "options" not in cnf._solver_kwargs("forward")
    fresh = CNF(f, trace="exact", end_time=0.5).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(cnf(x)[1], fresh(x)[1], atol=0, rtol=0)
