"""A pointwise CNF (point clouds) integrates one log-det per point, as PointFlow's reference: the solver's error
control must not tighten with the number of points."""

from __future__ import annotations

import pytest
import torch

from core.flows import CNF
from core.nn.concat_squash import ConcatSquashMLP


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_pointwise_cnf_takes_the_same_steps_for_a_cloud_repeated_16_times(trace):
    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(3, (32, 32), context_features=4), trace=trace, atol=1e-5, rtol=1e-5).eval()
    with torch.no_grad():
        for p in cnf.parameters():
            p.mul_(3.0)  # a dynamics that needs a few solver steps
    x, c = torch.randn(2, 64, 3), torch.randn(2, 4)
    nfe = []
    logdets = []
    for reps in (1, 16):
        torch.manual_seed(1)  # the same Hutchinson noise pattern per point is not needed: exact rms is what counts
        cnf.func.num_evals = 0
        with torch.no_grad():
            z, logdet = cnf(x.repeat(1, reps, 1), c)
        nfe.append(cnf.func.num_evals)
        logdets.append(logdet)
    assert nfe[0] > 8, "the test needs a dynamics the solver has to work on"
    if trace == "exact":
        # per-point error control: the repeated cloud's state has the same RMS, so the solver takes the same steps;
        # one summed log-det per shape would grow 16-fold and force more steps
        assert nfe[1] == nfe[0]
        torch.testing.assert_close(logdets[1], 16 * logdets[0], rtol=1e-5, atol=1e-4)
    else:
        assert nfe[1] <= nfe[0] + 6
