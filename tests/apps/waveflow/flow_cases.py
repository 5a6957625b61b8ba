"""WaveFlow's invertible layers for the generic invertibility / log-det suite (tests/core/test_flows_generic.py),
in both first-row conventions: ``copy`` (the references: the first row passes through) and ``transform`` (the
paper's equations: the first row is transformed from the context alone)."""

from __future__ import annotations

from apps.waveflow.model import HeightSqueeze, WaveFlowLayer
from core.flows import Sequential
from tests.core.flow_cases import Case


def _stack(first_row: str) -> Sequential:
    # squeeze + two layers in the paper's orders (natural, then reversed), height dilations 1 and 2
    return Sequential(
        HeightSqueeze(4),
        WaveFlowLayer(4, context_channels=2, channels=4, n_layers=2, dilations_h=[1, 2], first_row=first_row),
        WaveFlowLayer(4, context_channels=2, channels=4, n_layers=2, order=[3, 2, 1, 0], first_row=first_row),
    )


APP_CASES = [Case("height_squeeze", lambda: HeightSqueeze(4), (12,))]
for _first in ("copy", "transform"):
    APP_CASES += [
        Case(
            f"layer_unconditional_{_first}",
            lambda f=_first: WaveFlowLayer(4, context_channels=0, channels=4, n_layers=2, first_row=f),
            (4, 3),
        ),
        Case(
            f"layer_conditional_bipartite_{_first}",
            lambda f=_first: WaveFlowLayer(
                6, context_channels=3, channels=4, n_layers=3, order=[2, 1, 0, 5, 4, 3], first_row=f
            ),
            (6, 4),
            context=(3, 6, 4),
        ),
        Case(f"squeeze_and_two_layers_{_first}", lambda f=_first: _stack(f), (16,), context=(2, 4, 4)),
    ]
