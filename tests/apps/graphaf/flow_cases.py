"""GraphAF's node/edge flow stack for the generic suite (ConditionalAffine alone is a core case)."""

from __future__ import annotations

from core.flows import ConditionalAffine, Sequential
from tests.core.flow_cases import Case

APP_CASES = [
    Case(
        "conditional_affine_stack",
        lambda: Sequential(*[ConditionalAffine(9, 5, hidden=(8, 8)) for _ in range(3)]),
        (9,),
        context=(5,),
    ),
]
