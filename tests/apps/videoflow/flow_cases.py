"""VideoFlow's invertible layers in the generic invertibility / log-det suite (tests/core/test_flows_generic.py)."""

from __future__ import annotations

from apps.videoflow.model import FrameGlow, LightTemporalGaussian, TemporalGaussian, VideoFlowTransform
from tests.core.flow_cases import Case

APP_CASES = [
    # per-frame multi-scale Glow: (1, 8, 8) -> levels (2, 4, 4) and (8, 2, 2)
    Case("frame_glow", lambda: FrameGlow(1, 8, levels=2, steps=1, hidden=8), (1, 8, 8)),
    Case("frame_glow_additive", lambda: FrameGlow(1, 8, levels=2, steps=1, hidden=8, coupling="additive"), (1, 8, 8)),
    # the reference prior of one level on (T, C, H, W), conditioned on the coarser level (T, Cc, H, W): 3 frames with
    # K = 2 (2 unconditional, 1 conditional), 2 residual blocks, gated (dilations: test_model.py)
    Case(
        "temporal_gaussian_conv3d",
        lambda: TemporalGaussian(1, context_channels=1, num_cond=2, hidden=3, blocks=2, size=3),
        (3, 1, 3, 3),
        context=(3, 1, 3, 3),
    ),
    Case(
        "temporal_gaussian_conv3d_top_relu_k1_no_skip",
        lambda: TemporalGaussian(2, num_cond=1, hidden=3, blocks=1, activation="relu", latent_skip=False),
        (3, 2, 2, 2),
    ),
    # the light prior (one K x 3 x 3 convolution, then 2-D)
    Case(
        "temporal_gaussian_light",
        lambda: LightTemporalGaussian(2, context_channels=2, num_cond=2, hidden=8, blocks=1),
        (3, 2, 3, 3),
        context=(3, 2, 3, 3),
    ),
    Case(
        "temporal_gaussian_light_top_no_skip",
        lambda: LightTemporalGaussian(3, num_cond=1, hidden=8, latent_skip=False),
        (3, 3, 2, 2),
    ),
    # the whole video map: Glow per frame + every level's prior; block-triangular in (time, level)
    Case(
        "video_transform",
        lambda: VideoFlowTransform(1, 8, levels=2, steps=1, hidden=8, num_cond=2, prior_hidden=4, prior_blocks=1),
        (3, 1, 8, 8),
    ),
    Case(
        "video_transform_light",
        lambda: VideoFlowTransform(
            1, 8, levels=2, steps=1, hidden=8, num_cond=2, prior="light", prior_hidden=8, prior_blocks=1
        ),  # fmt: skip
        (3, 1, 8, 8),
    ),
]
