"""Every Flow in core and apps: invertibility, log-det sign symmetry, log-det == log|det J| of autograd, per sample;
for dequantization layers, log-det == -D log(levels) - log q(u|x) with q from the autograd Jacobian of the noise.
Every Flow subclass in core/ and apps/ must have a case (see ``test_every_flow_class_has_a_case``)."""

from __future__ import annotations

import importlib
import math
import pkgutil

import pytest
import torch

import apps
import core
from core.flows.base import Flow
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
    if case.dequantization:  # the forward log-det holds the bound's -log q(u|x), the inverse only the scaling
        torch.testing.assert_close(ld_inv, torch.full_like(ld_inv, x[0].numel() * math.log(flow.levels)))
    else:
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


@pytest.mark.parametrize("case", [c for c in CASES if c.dequantization], ids=lambda c: c.name)
def test_dequantization_logdet_is_the_bound_of_its_noise(case: Case):
    """For fixed base noise ``eps`` the layer is deterministic: ``u(eps) = y * levels - x`` has density
    ``log q(u|x) = log p(eps) - log|det du/deps|`` (autograd), and the log-det must be ``-D log(levels) - log q``."""
    flow = build(case)
    x, c = make_input(case, BATCH), context_for(case)
    initialise(flow, case, x, c)
    d, levels = x[0].numel(), flow.levels
    torch.manual_seed(3)
    eps = flow.draw_noise(x)
    torch.manual_seed(3)
    y_fwd, ld_fwd = flow(x, c)
    y, logdet = flow.dequantize(x, eps, c)
    torch.testing.assert_close(y_fwd, y, atol=0, rtol=0, msg="forward must be dequantize(x, draw_noise(x))")
    torch.testing.assert_close(ld_fwd, logdet, atol=0, rtol=0)
    u = y * levels - x
    assert ((u > 0) & (u < 1)).all(), "the noise must stay inside the bin"
    jac = torch.autograd.functional.jacobian(lambda e: flow.dequantize(x, e, c)[0] * levels, eps)
    jac = jac.reshape(BATCH, d, BATCH, d)
    noise_lp = flow.noise_log_prob(eps)
    for b in range(BATCH):
        _, logabs = torch.linalg.slogdet(jac[b, :, b, :])
        log_q = noise_lp[b] - logabs
        torch.testing.assert_close(logdet[b], -d * math.log(levels) - log_q, atol=case.tol * 100, rtol=case.tol)
        for b2 in range(BATCH):
            if b2 != b:
                assert jac[b, :, b2, :].abs().max() < 1e-12, f"{case.name}: sample {b} depends on {b2}'s noise"


# Flow subclasses that are abstract bases, never built on their own; each concrete subclass has its own case.
ABSTRACT_FLOWS = {
    "core.flows.base.Flow",  # the interface itself
    "core.flows.coupling._Coupling",  # shared code of AdditiveCoupling / AffineCoupling
    "core.flows.dequantization._Dequantization",  # shared code of Uniform/VariationalDequantization
    "apps.videoflow.model.TemporalPrior",  # VideoFlow's latent prior; its subclasses give the network
}


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def _import_every_module(package) -> None:
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # runs a command line on import
        importlib.import_module(info.name)


def test_every_flow_class_has_a_case():
    """Importing every module of core/ and apps/ registers every Flow subclass; each must be built by some case
    (as the layer itself or inside a composite case), so that a new layer cannot skip the generic suite."""
    _import_every_module(core)
    _import_every_module(apps)
    name = lambda cls: f"{cls.__module__}.{cls.__qualname__}"  # noqa: E731
    defined = {cls for cls in _all_subclasses(Flow) | {Flow} if cls.__module__.split(".")[0] in ("core", "apps")}
    covered = set()
    for case in CASES:
        covered |= {type(m) for m in case.build().modules()}
    stale = ABSTRACT_FLOWS - {name(cls) for cls in defined}
    assert not stale, f"ABSTRACT_FLOWS names classes that no longer exist: {sorted(stale)}"
    missing = sorted(name(cls) for cls in defined - covered if name(cls) not in ABSTRACT_FLOWS)
    assert not missing, (
        f"Flow subclasses with no case in tests/core/flow_cases.py (or an app's flow_cases.py): {missing}"
    )
