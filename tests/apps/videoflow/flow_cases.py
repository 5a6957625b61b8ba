"""VideoFlow's invertible layers in the generic invertibility / log-det suite (tests/core/test_flows_generic.py)."""

from __future__ import annotations

from apps.videoflow.model import FrameGlow, TemporalGaussian, VideoFlowTransform
from tests.core.flow_cases import Case

APP_CASES = [
    # per-frame multi-scale Glow: (1, 8, 8) -> levels (2, 4, 4) and (8, 2, 2)
    Case("frame_glow", lambda: FrameGlow(1, 8, levels=2, steps=1, hidden=8), (1, 8, 8)),
    Case("frame_glow_additive", lambda: FrameGlow(1, 8, levels=2, steps=1, hidden=8, coupling="additive"), (1, 8, 8)),
    # latent dynamics prior of one level on (T, C, H, W), conditioned on the coarser level (T, Cc, H, W)
    Case(
        "temporal_gaussian",
        lambda: TemporalGaussian(2, context_channels=2, num_cond=2, hidden=8, blocks=1),
        (3, 2, 3, 3),
        context=(3, 2, 3, 3),
    ),
    Case(
        "temporal_gaussian_top_no_skip",
        lambda: TemporalGaussian(3, num_cond=1, hidden=8, latent_skip=False),
        (3, 3, 2, 2),
    ),
    # the whole video map: Glow per frame + every level's prior; block-triangular in (time, level)
    Case(
        "video_transform",
        lambda: VideoFlowTransform(1, 8, levels=2, steps=1, hidden=8, num_cond=2, prior_hidden=8, prior_blocks=1),
        (3, 1, 8, 8),
    ),
]
