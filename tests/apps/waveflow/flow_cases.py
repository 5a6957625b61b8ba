"""WaveFlow's invertible layers for the generic invertibility / log-det suite (tests/core/test_flows_generic.py)."""

from __future__ import annotations

from apps.waveflow.model import HeightSqueeze, WaveFlowLayer
from core.flows import Sequential
from tests.core.flow_cases import Case


def _stack() -> Sequential:
    # squeeze + two layers in the paper's orders (natural, then reversed), height dilations 1 and 2
    return Sequential(
        HeightSqueeze(4),
        WaveFlowLayer(4, context_channels=2, channels=4, n_layers=2, dilations_h=[1, 2]),
        WaveFlowLayer(4, context_channels=2, channels=4, n_layers=2, order=[3, 2, 1, 0]),
    )


APP_CASES = [
    Case("height_squeeze", lambda: HeightSqueeze(4), (12,)),
    Case("layer_unconditional", lambda: WaveFlowLayer(4, context_channels=0, channels=4, n_layers=2), (4, 3)),
    Case(
        "layer_conditional_bipartite",
        lambda: WaveFlowLayer(6, context_channels=3, channels=4, n_layers=3, order=[2, 1, 0, 5, 4, 3]),
        (6, 4),
        context=(3, 6, 4),
    ),
    Case("squeeze_and_two_layers", _stack, (16,), context=(2, 4, 4)),
]
