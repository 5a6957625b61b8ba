"""PointFlow's invertible layers for the generic invertibility / log-det suite (tests/core/test_flows_generic.py)."""

from __future__ import annotations

from apps.pointflow.model import MovingBatchNorm, cnf_chain
from tests.core.flow_cases import Case


def _point_chain():
    # the point CNF as the model builds it: BN, CNF (conditioned on a shape latent), BN; tight solves for the suite
    return cnf_chain(3, (8, 8), context_features=4, blocks=1, trace="exact", atol=1e-10, rtol=1e-10, adjoint=False)


APP_CASES = [
    Case("moving_batch_norm_points", lambda: MovingBatchNorm(3), (5, 3)),
    Case("moving_batch_norm_latent", lambda: MovingBatchNorm(6), (6,)),
    Case("point_cnf_with_moving_batch_norm", _point_chain, (4, 3), context=(4,), tol=1e-7),
]
