"""CNF regularisers belong to the solve that computed them: a later inverse solve (a sample inside the training
step) must neither crash the adjoint backward pass nor drop or change the forward solve's regulariser."""

from __future__ import annotations

import pytest
import torch

from core.flows import CNF, regularization_loss
from core.nn import ConcatSquashMLP


def _cnf(adjoint: bool) -> CNF:
    torch.manual_seed(0)
    dyn = ConcatSquashMLP(3, hidden=(16,), context_features=0)
    cnf = CNF(dyn, trace="hutchinson", kinetic_energy=0.5, jacobian_norm=0.25, solver="rk4", step_size=0.1,
              adjoint=adjoint, end_time=0.5)  # fmt: skip
    return cnf.double().train()


def _step(cnf: CNF, x: torch.Tensor, sample_in_between: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cnf.zero_grad()
    torch.manual_seed(1)  # the Hutchinson noise of the forward solve
    z, logdet = cnf(x)
    if sample_in_between:
        torch.manual_seed(2)
        cnf.inverse(torch.randn_like(x))  # e.g. samples drawn for logging inside the step, with grad enabled
    reg = regularization_loss(cnf)
    assert reg is not None, "the forward solve's regulariser was lost"
    (0.5 * z.square().sum() - logdet.sum() + reg).backward()
    return reg.detach(), [p.grad.clone() for p in cnf.parameters()]


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_numerics_cnf_regulariser_survives_an_inverse_solve_before_backward(adjoint):
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cnf = _cnf(adjoint)
    reg_ref, grads_ref = _step(cnf, x, sample_in_between=False)
    reg, grads = _step(cnf, x, sample_in_between=True)
    torch.testing.assert_close(reg, reg_ref, rtol=1e-12, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_numerics_cnf_regulariser_is_collected_once():
    """``regularization_loss`` collects what forward solves recorded since the last collection."""
    cnf = _cnf(adjoint=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    cnf(x)
    first = regularization_loss(cnf)
    assert first is not None
    assert regularization_loss(cnf) is None, "a collected regulariser must not be added to the next step's loss"
    cnf(x)
    cnf(x)  # two forward solves in one step: both regularisers count
    both = regularization_loss(cnf)
    assert both is not None and both.item() > first.item()


def test_numerics_cnf_inverse_alone_records_nothing():
    cnf = _cnf(adjoint=True)
    cnf.inverse(torch.randn(4, 3, dtype=torch.float64))
    assert regularization_loss(cnf) is None


def test_numerics_cnf_uncollected_records_stay_bounded():
    from core.flows import continuous

    cnf = _cnf(adjoint=False)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="never collected"):
        for _ in range(continuous._MAX_PENDING + 1):
            cnf(x)
    assert len(cnf._pending) == continuous._MAX_PENDING
