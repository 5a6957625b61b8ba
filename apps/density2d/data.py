"""Toy 2-D distributions (FFJORD's set) and a DataModule; or any (N, 2) ``.npy``/``.csv`` file of points.

Every named distribution is sampled deterministically from a seed. For ``moons``, ``circles`` and
``8gaussians`` the exact log-density is known (:func:`true_log_prob`), so a fitted model's test NLL can be
compared with the data's own entropy.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DATASETS", "sample_toy", "true_log_prob", "load_points", "Toy2DDataModule"]

DATASETS = ("moons", "circles", "8gaussians", "checkerboard", "pinwheel", "spirals")
_MOON_NOISE = 0.2  # sklearn make_moons(noise=0.1), then scaled by 2 as FFJORD
_CIRCLE_NOISE = 0.08
_GAUSS_STD = 0.5 / 1.414  # FFJORD: std 0.5 around centres at radius 4, then everything / 1.414


def _moon_curves(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outer = np.stack([np.cos(t), np.sin(t)], 1)
    inner = np.stack([1 - np.cos(t), 1 - np.sin(t) - 0.5], 1)
    shift = np.array([-1.0, -0.2])
    return outer * 2 + shift, inner * 2 + shift


def _gauss_centers() -> np.ndarray:
    s = 1 / math.sqrt(2)
    c = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)], dtype=np.float64)
    return c * 4 / 1.414


def sample_toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points (float32, (n, 2)) from the named distribution, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        t = rng.uniform(0, math.pi, n)
        outer, inner = _moon_curves(t)
        which = rng.random(n) < 0.5
        x = np.where(which[:, None], outer, inner) + _MOON_NOISE * rng.standard_normal((n, 2))
    elif name == "circles":
        t = rng.uniform(0, 2 * math.pi, n)
        r = np.where(rng.random(n) < 0.5, 1.0, 0.5)[:, None] * 3.0
        x = r * np.stack([np.cos(t), np.sin(t)], 1) + _CIRCLE_NOISE * rng.standard_normal((n, 2))
    elif name == "8gaussians":
        x = _gauss_centers()[rng.integers(0, 8, n)] + _GAUSS_STD * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0 + np.floor(x1) % 2
        x = np.stack([x1, x2], 1) * 2
    elif name == "pinwheel":
        radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
        rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
        feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
        feats[:, 0] += 1.0
        labels = rng.integers(0, num_classes, n)
        angles = rads[labels] + rate * np.exp(feats[:, 0])
        rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
        x = 2 * np.einsum("ti,tij->tj", feats, rot)
    elif name == "spirals":
        m = np.sqrt(rng.random(n // 2)) * 540 * (2 * np.pi) / 360
        d1x = -np.cos(m) * m + rng.random(n // 2) * 0.5
        d1y = np.sin(m) * m + rng.random(n // 2) * 0.5
        x = np.vstack([np.stack([d1x, d1y], 1), np.stack([-d1x, -d1y], 1)]) / 3
        x = x[rng.permutation(len(x))]
        if len(x) < n:
            x = np.vstack([x, x[: n - len(x)]])
        x = x + 0.1 * rng.standard_normal(x.shape)
    else:
        raise ValueError(f"unknown 2-D dataset {name!r}; choose one of {', '.join(DATASETS)} or give a file path")
    return x.astype(np.float32)


def _log_normal(d2: np.ndarray, std: float) -> np.ndarray:
    return -d2 / (2 * std * std) - math.log(2 * math.pi * std * std)


def _logmeanexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).mean(axis=axis, keepdims=True))).squeeze(axis)


def true_log_prob(name: str, x: np.ndarray, grid: int = 4096) -> np.ndarray:
    """Exact log-density of ``moons``, ``circles`` or ``8gaussians`` at ``x`` (n, 2); curves by quadrature."""
    x = np.asarray(x, dtype=np.float64)
    if name == "8gaussians":
        d2 = ((x[:, None, :] - _gauss_centers()[None]) ** 2).sum(-1)
        return _logmeanexp(_log_normal(d2, _GAUSS_STD), 1)
    if name == "moons":
        t = (np.arange(grid) + 0.5) * math.pi / grid
        centres, std = np.concatenate(_moon_curves(t)), _MOON_NOISE
    elif name == "circles":
        t = (np.arange(grid) + 0.5) * 2 * math.pi / grid
        ring = np.stack([np.cos(t), np.sin(t)], 1)
        centres, std = np.concatenate([3.0 * ring, 1.5 * ring]), _CIRCLE_NOISE
    else:
        raise ValueError(f"no closed-form density for {name!r} (known: moons, circles, 8gaussians)")
    out = np.empty(len(x))
    for i in range(0, len(x), 256):  # chunks keep the (chunk, 2 * grid) distance matrix small
        d2 = ((x[i : i + 256, None, :] - centres[None]) ** 2).sum(-1)
        out[i : i + 256] = _logmeanexp(_log_normal(d2, std), 1)
    return out


def load_points(path: str | Path) -> np.ndarray:
    """(N, 2) float points from ``.npy`` or ``.csv`` (two numeric columns, optional header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".npy":
        x = np.load(path)
    elif path.suffix in (".csv", ".txt"):
        try:
            x = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:
            x = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
    else:
        raise ValueError(f"{path}: expected a .npy or .csv file of (N, 2) points")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{path}: expected shape (N, 2), found {x.shape}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"{path}: row {int(np.argmax(bad))} is not finite ({int(bad.sum())} such rows)")
    return x.astype(np.float32)


class Toy2DDataModule(pl.LightningDataModule):
    """Train/val/test splits of a named toy distribution (independent seeds) or of a points file (shuffled 80/10/10)."""

    def __init__(
        self,
        dataset: str = "moons",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 5000,
        batch_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.sizes, self.seed = (n_train, n_val, n_test), seed
        self.splits: dict[str, torch.Tensor] = {}

    @property
    def is_named(self) -> bool:
        return self.dataset in DATASETS

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.is_named:
            arrays = [sample_toy(self.dataset, n, self.seed * 3 + k) for k, n in enumerate(self.sizes)]
        else:
            x = load_points(self.dataset)
            x = x[np.random.default_rng(self.seed).permutation(len(x))]
            a, b = int(0.8 * len(x)), int(0.9 * len(x))
            arrays = [x[:a], x[a:b], x[b:]]
        self.splits = {k: torch.from_numpy(v) for k, v in zip(("train", "val", "test"), arrays)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = TensorDataset(self.splits[split])
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle and len(ds) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
