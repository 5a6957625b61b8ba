"""Renders of point clouds for people to look at (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["render_clouds"]


def render_clouds(
    clouds: Sequence[np.ndarray], path: str | Path, titles: Sequence[str] | None = None, ncols: int = 4
) -> Path:
    """A grid of 3-D scatter renders (ShapeNet's y axis up), one per (N, 3) cloud, written as PNG."""
    n = len(clouds)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = plt.figure(figsize=(3 * ncols, 3 * nrows))
    for i, pts in enumerate(clouds):
        pts = np.asarray(pts)
        ax = fig.add_subplot(nrows, ncols, i + 1, projection="3d")
        ax.scatter(pts[:, 0], pts[:, 2], pts[:, 1], s=0.5, c=pts[:, 1], cmap="viridis", depthshade=False)
        centre, radius = (pts.max(0) + pts.min(0)) / 2, (pts.max(0) - pts.min(0)).max() / 2 + 1e-6
        ax.set_xlim(centre[0] - radius, centre[0] + radius)
        ax.set_ylim(centre[2] - radius, centre[2] + radius)
        ax.set_zlim(centre[1] - radius, centre[1] + radius)
        ax.view_init(elev=20, azim=-60)
        ax.set_axis_off()
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
