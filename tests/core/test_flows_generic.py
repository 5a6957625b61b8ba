"""Every Flow in core: invertibility, log-det sign symmetry, log-det == log|det J| of autograd, per sample."""

from __future__ import annotations

import pytest
import torch

from tests.core.flow_cases import CASES, Case, make_input

BATCH = 3


def build(case: Case) -> torch.nn.Module:
    flow = case.build().double()
    flow.train()
    with torch.no_grad():  # move away from the identity initialisation so the checks have teeth
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def context_for(case: Case, batch: int = BATCH):
    return None if case.context is None else torch.randn(batch, *case.context, dtype=torch.float64)


def initialise(flow, case, x, c):
    # data-dependent initialisation (ActNorm) happens on the first training forward; check in eval afterwards
    flow(x, c)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow.eval()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inverse_of_forward_is_identity(case: Case):
    flow = build(case)
    x, c = make_input(case, BATCH), context_for(case)
    initialise(flow, case, x, c)
    z, ld_fwd = flow(x, c)
    x_rec, ld_inv = flow.inverse(z, c)
    assert z.shape[0] == BATCH and z[0].numel() == x[0].numel(), "a flow keeps the batch and the dimension"
    assert ld_fwd.shape == (BATCH,) and ld_inv.shape == (BATCH,)
    torch.testing.assert_close(x_rec, x, atol=1e-6 if case.tol > 1e-8 else 1e-9, rtol=0)
    torch.testing.assert_close(ld_inv, -ld_fwd, atol=1e-6 if case.tol > 1e-8 else 1e-9, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_of_inverse_is_identity(case: Case):
    flow = build(case)
    x, c = make_input(case, BATCH), context_for(case)
    initialise(flow, case, x, c)
    torch.manual_seed(1)  # stochastic layers (dequantization noise) draw the same noise in both forward calls
    z, _ = flow(x, c)
    x2, _ = flow.inverse(z, c)
    torch.manual_seed(1)
    z2, _ = flow(x2, c)
    torch.testing.assert_close(z2, z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.jacobian], ids=lambda c: c.name)
def test_logdet_matches_autograd_jacobian(case: Case):
    flow = build(case)
    x, c = make_input(case, BATCH), context_for(case)
    initialise(flow, case, x, c)
    d = x[0].numel()
    cross_tol = 1e-12 if case.tol <= 1e-8 else 1e-10  # adaptive ODE solvers share step sizes across a batch
    for direction in ("forward", "inverse") if case.inverse_jacobian else ("forward",):
        fn = flow if direction == "forward" else flow.inverse
        inp = x if direction == "forward" else flow(x, c)[0].detach()
        _, logdet = fn(inp, c)
        jac = torch.autograd.functional.jacobian(lambda t, fn=fn: fn(t, c)[0], inp).reshape(BATCH, d, BATCH, d)
        for b in range(BATCH):
            sign, logabs = torch.linalg.slogdet(jac[b, :, b, :])
            assert sign != 0, f"{case.name} {direction}: singular Jacobian"
            torch.testing.assert_close(logdet[b], logabs, atol=case.tol * 100, rtol=case.tol)
            for b2 in range(BATCH):
                if b2 != b:  # samples never interact
                    assert jac[b, :, b2, :].abs().max() < cross_tol, f"{case.name}: sample {b} depends on {b2}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_parameter_gets_a_gradient(case: Case):
    flow = build(case)
    if not any(True for _ in flow.parameters()):
        pytest.skip("parameter-free layer")
    x, c = make_input(case, BATCH), context_for(case)
    initialise(flow, case, x, c)
    flow.train()
    z, logdet = flow(x, c)
    (z.square().sum() - logdet.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{case.name}: no gradient for {name}"
