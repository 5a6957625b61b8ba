"""Mel-spectrogram figures for people to look at (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_mels"]


def plot_mels(mels: Sequence[np.ndarray], titles: Sequence[str], path: str | Path) -> Path:
    """Stack log-mels (n_mels, frames) vertically with a shared colour scale; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mels = [np.asarray(m) for m in mels]
    lo, hi = min(float(m.min()) for m in mels), max(float(m.max()) for m in mels)
    fig, axes = plt.subplots(len(mels), 1, figsize=(8, 2.6 * len(mels)), squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    for ax, m, t in zip(axes[:, 0], mels, titles):
        im = ax.imshow(m, origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="magma", interpolation="none")
        ax.set_title(t, fontsize=9)
        ax.set_ylabel("mel band")
    axes[-1, 0].set_xlabel("frame (hop 256)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="log magnitude")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
