"""Pictures of a fitted 2-D density: the data, the model's density on a grid, and the model's samples."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["density_on_grid", "plot_density"]


def _extent(data: np.ndarray, margin: float = 0.15) -> tuple[float, float, float, float]:
    lo, hi = np.percentile(data, 0.5, axis=0), np.percentile(data, 99.5, axis=0)
    pad = (hi - lo) * margin
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


@torch.no_grad()
def density_on_grid(model: nn.Module, extent, resolution: int = 150, chunk: int = 8192) -> np.ndarray:
    """p(x) on a (resolution, resolution) grid over ``extent`` = (xmin, xmax, ymin, ymax); rows are y."""
    xs = torch.linspace(extent[0], extent[1], resolution)
    ys = torch.linspace(extent[2], extent[3], resolution)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    device = next(model.parameters()).device
    logp = torch.cat([model.log_prob(pts[i : i + chunk].to(device)).cpu() for i in range(0, len(pts), chunk)])
    return logp.exp().reshape(resolution, resolution).numpy()


def plot_density(model: nn.Module, data: np.ndarray, path: str | Path, title: str = "", n_samples: int = 5000) -> Path:
    """Three panels (data histogram, model density, model samples) written to ``path`` as PNG."""
    extent = _extent(data)
    dens = density_on_grid(model, extent)
    with torch.no_grad():
        samples = model.sample(n_samples).cpu().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    bins = [np.linspace(extent[0], extent[1], 120), np.linspace(extent[2], extent[3], 120)]
    axes[0].hist2d(data[:, 0], data[:, 1], bins=bins, cmap="viridis")
    axes[0].set_title("data")
    axes[1].imshow(dens, origin="lower", extent=extent, cmap="viridis", aspect="auto")
    axes[1].set_title("model density")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=bins, cmap="viridis")
    axes[2].set_title("model samples")
    for ax in axes:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
