"""GraphAF's invertible layers for the generic flow suite (``tests/core/test_flows_generic.py -k graphaf``)."""

from __future__ import annotations

from apps.graphaf.flows import ConditionalAffine
from core.flows import Sequential
from tests.core.flow_cases import Case

APP_CASES = [
    Case("conditional_affine", lambda: ConditionalAffine(4, 6, hidden=(16,)), (4,), context=(6,)),
    Case(
        "conditional_affine_stack",
        lambda: Sequential(*[ConditionalAffine(9, 5, hidden=(8, 8)) for _ in range(3)]),
        (9,),
        context=(5,),
    ),
]
