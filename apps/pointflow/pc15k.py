"""ShapeNetCore.v2.PC15k point clouds, PointFlow's data: the category table, one cloud file, and one split.

The PC15k layout is ``<root>/<synset>/{train,val,test}/<id>.npy``, each file a float (15000, 3) cloud sampled
on one ShapeNet surface. As in PointFlow's ``Uniform15KPC``, the first two thirds of a cloud (10,000 of 15,000
points) are its *training pool* and the last third (5,000) its *test pool*; items subsample ``points`` from
the first and ``eval_points`` from the second.

Memory: clouds are held in memory as float32, 180 kB per shape (the train split of PC15k airplanes,
2,832 shapes, is about 0.5 GB; all 6,778 chairs would be 1.2 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from apps.pointflow.io import read_cloud

__all__ = [
    "SHAPENET_CATEGORIES",
    "SPLITS",
    "NORMALIZE_MODES",
    "resolve_categories",
    "category_folder",
    "split_entries",
    "NormStats",
    "PC15kDataset",
]

# ShapeNetCore.v2 category names -> synset ids, as PointFlow's ``cate_to_synsetid`` (from latent_3d_points).
SHAPENET_CATEGORIES: dict[str, str] = {
    "airplane": "02691156",
    "bag": "02773838",
    "basket": "02801938",
    "bathtub": "02808440",
    "bed": "02818832",
    "bench": "02828884",
    "bottle": "02876657",
    "bowl": "02880940",
    "bus": "02924116",
    "cabinet": "02933112",
    "can": "02747177",
    "camera": "02942699",
    "cap": "02954340",
    "car": "02958343",
    "chair": "03001627",
    "clock": "03046257",
    "dishwasher": "03207941",
    "monitor": "03211117",
    "table": "04379243",
    "telephone": "04401088",
    "tin_can": "02946921",
    "tower": "04460130",
    "train": "04468005",
    "keyboard": "03085013",
    "earphone": "03261776",
    "faucet": "03325088",
    "file": "03337140",
    "guitar": "03467517",
    "helmet": "03513137",
    "jar": "03593526",
    "knife": "03624134",
    "lamp": "03636649",
    "laptop": "03642806",
    "speaker": "03691459",
    "mailbox": "03710193",
    "microphone": "03759954",
    "microwave": "03761084",
    "motorcycle": "03790512",
    "mug": "03797390",
    "piano": "03928116",
    "pillow": "03938244",
    "pistol": "03948459",
    "pot": "03991062",
    "printer": "04004475",
    "remote_control": "04074963",
    "rifle": "04090263",
    "rocket": "04099429",
    "skateboard": "04225987",
    "sofa": "04256520",
    "stove": "04330267",
    "vessel": "04530566",
    "washer": "04554684",
    "cellphone": "02992529",
    "birdhouse": "02843684",
    "bookshelf": "02871439",
}
_SYNSET_TO_NAME = {v: k for k, v in SHAPENET_CATEGORIES.items()}

SPLITS = ("train", "val", "test")
NORMALIZE_MODES = ("global", "shape", "axis", "none")


# ----------------------------------------------------------------------------------------------- categories


def _known_names() -> str:
    return ", ".join(sorted(SHAPENET_CATEGORIES))


def split_entries(categories: str | Sequence[str]) -> list[str]:
    items = [categories] if isinstance(categories, str) else list(categories)
    out = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not out:
        raise ValueError(f"no categories given; use 'all', synset ids, or names: {_known_names()}")
    return out


def resolve_categories(categories: str | Sequence[str]) -> list[str]:
    """ShapeNet synset ids for names (``"chair"``), synset ids (``"03001627"``) or ``"all"`` (all 55).

    A string may hold several entries separated by commas. Order is kept, duplicates dropped.
    """
    out: list[str] = []
    for entry in split_entries(categories):
        key = entry.lower()
        if key == "all":
            ids = list(SHAPENET_CATEGORIES.values())
        elif key in SHAPENET_CATEGORIES:
            ids = [SHAPENET_CATEGORIES[key]]
        elif key in _SYNSET_TO_NAME:
            ids = [key]
        else:
            raise ValueError(
                f"unknown ShapeNet category {entry!r}; known names (or their synset ids): {_known_names()}"
            )
        out.extend(i for i in ids if i not in out)
    return out


def category_folder(name: str) -> str:
    """Folder of a category in a PC15k tree: the synset id for a ShapeNet name or id, else the name itself."""
    key = name.strip().lower()
    if key in SHAPENET_CATEGORIES:
        return SHAPENET_CATEGORIES[key]
    if key in _SYNSET_TO_NAME:
        return key
    return name.strip()


def _dataset_folders(root: Path, categories: str | Sequence[str]) -> list[str]:
    """Category folders for a dataset: ShapeNet names/ids/``all`` as synsets, other names if ``root/<name>`` exists."""
    out: list[str] = []
    for entry in split_entries(categories):
        try:
            ids = resolve_categories(entry)
        except ValueError:
            if not (root / entry).is_dir():
                raise ValueError(
                    f"unknown category {entry!r}: not a ShapeNet category and no folder {root / entry}; "
                    f"known names (or their synset ids): {_known_names()}"
                ) from None
            ids = [entry]
        out.extend(i for i in ids if i not in out)
    return out


# ----------------------------------------------------------------------------------------------- clouds


def _pool_sizes(total: int) -> tuple[int, int]:
    """(training pool, test pool) sizes of a cloud: first two thirds, last third (10,000 / 5,000 for PC15k)."""
    n_test = total // 3
    return total - n_test, n_test


@dataclass
class NormStats:
    """Normalisation ``x_norm = (x - mean) / std``, as PointFlow's ``Uniform15KPC``.

    ``mode`` is one of ``global`` (mean (1,1,3), one scalar std (1,1,1) over all coordinates of all training
    shapes), ``shape`` (per-shape mean (S,1,3) and scalar std (S,1,1)), ``axis`` (global mean (1,1,3), per-axis
    std (1,1,3)) or ``none`` (zeros and ones). Scalar stds are those of the flattened coordinates, as PointFlow.
    """

    mean: np.ndarray
    std: np.ndarray
    mode: str = "global"

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalisation {self.mode!r}; choose one of {', '.join(NORMALIZE_MODES)}")
        self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 3)
        std = np.asarray(self.std, dtype=np.float32)
        self.std = std.reshape(-1, 1, 3 if self.mode == "axis" else 1)
        if not (np.isfinite(self.std).all() and (self.std > 0).all() and np.isfinite(self.mean).all()):
            raise ValueError(f"normalisation stats must be finite with std > 0 (mode {self.mode!r})")

    @property
    def per_shape(self) -> bool:
        return self.mode == "shape"


def _compute_stats(clouds: np.ndarray, mode: str, chunk: int = 256) -> NormStats:
    """Stats of ``clouds`` (S, P, 3) in float64, chunked over shapes so no full-size temporary is made."""
    s = len(clouds)
    if mode == "none":
        return NormStats(np.zeros((1, 1, 3)), np.ones((1, 1, 1)), mode)
    if mode == "shape":
        mean, std = np.empty((s, 1, 3)), np.empty((s, 1, 1))
        for i in range(0, s, chunk):
            c = clouds[i : i + chunk].astype(np.float64)
            mean[i : i + chunk] = c.mean(1, keepdims=True)
            std[i : i + chunk, 0, 0] = c.reshape(len(c), -1).std(1)
        return NormStats(mean, std, mode)
    count = clouds.shape[0] * clouds.shape[1]
    total = sum(clouds[i : i + chunk].sum((0, 1), dtype=np.float64) for i in range(0, s, chunk))
    mean = total / count  # (3,)
    if mode == "axis":
        sq = sum((((clouds[i : i + chunk] - mean) ** 2).sum((0, 1), dtype=np.float64)) for i in range(0, s, chunk))
        return NormStats(mean, np.sqrt(sq / count), mode)
    flat_mean = mean.mean()  # PointFlow: all_points.reshape(-1).std(), i.e. about the mean of all coordinates
    sq = sum(((clouds[i : i + chunk].astype(np.float64) - flat_mean) ** 2).sum() for i in range(0, s, chunk))
    return NormStats(mean, np.sqrt(np.array([sq / (count * 3)])), mode)


class PC15kDataset(Dataset):
    """One split of a PC15k tree, for the given categories, loaded into memory and normalised.

    Arguments:
        root: the PC15k root holding ``<synset>/<split>/<id>.npy``.
        categories: ShapeNet names, synset ids, ``"all"``, or names of other folders under ``root``.
        split: ``train``, ``val`` or ``test``.
        points / eval_points: points per item from the training / test pool.
        normalize: ``global``, ``shape``, ``axis`` or ``none`` (see :class:`NormStats`).
        stats: the train split's stats, for val/test under ``global``/``axis``; under ``shape``/``none`` the
            stats depend on each shape only and are computed here.
        random_subsample: new random points (without replacement) every call, else the first points of the pool.
        seed: seeds the subsampling; in DataLoader workers it is combined with the worker's seed.
        max_shapes: the first ``max_shapes`` files (sorted by name) of each category, for quick runs.

    Items are dicts: ``x`` (points, 3), ``test_points`` (eval_points, 3), ``mean`` (1, 3), ``std`` (1, 1) or
    (1, 3) (all float32; ``x * std + mean`` is in the file's coordinates), ``idx`` (int), ``category`` (folder).
    """

    def __init__(
        self,
        root: str | Path,
        categories: str | Sequence[str] = "airplane",
        split: str = "train",
        points: int = 2048,
        eval_points: int = 2048,
        normalize: str = "global",
        stats: NormStats | None = None,
        random_subsample: bool = True,
        seed: int = 0,
        max_shapes: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalisation {normalize!r}; choose one of {', '.join(NORMALIZE_MODES)}")
        if stats is not None and stats.mode != normalize:
            raise ValueError(f"stats were computed for normalisation {stats.mode!r}, but normalize={normalize!r}")
        if points < 1 or eval_points < 1:
            raise ValueError(f"points and eval_points must be positive, found {points} and {eval_points}")
        if max_shapes is not None and max_shapes < 1:
            raise ValueError(f"max_shapes must be positive or None, found {max_shapes}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"point cloud root {self.root} does not exist (expected <root>/<synset>/{split}/)")
        self.split, self.normalize = split, normalize
        self.points, self.eval_points = points, eval_points
        self.random_subsample, self.seed = random_subsample, seed
        self.categories = _dataset_folders(self.root, categories)

        self.files: list[Path] = []
        self.shape_categories: list[str] = []
        missing = [str(self.root / c) for c in self.categories if not (self.root / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"category folder(s) missing: {', '.join(missing)}")
        for cat in self.categories:
            folder = self.root / cat / split
            if not folder.is_dir():
                raise FileNotFoundError(f"split folder {folder} does not exist")
            files = sorted(folder.glob("*.npy"))[:max_shapes]
            if not files:
                raise ValueError(f"split folder {folder} holds no .npy point clouds")
            self.files += files
            self.shape_categories += [cat] * len(files)
        self.clouds = self._load()
        self.train_pool, self.test_pool = _pool_sizes(self.clouds.shape[1])

        if stats is None or normalize in ("shape", "none"):
            stats = _compute_stats(self.clouds, normalize)
        self.stats = stats
        for i in range(0, len(self.clouds), 256):  # in place, chunked: no second copy of the clouds
            sl = slice(i, i + 256)
            m = stats.mean[sl] if stats.per_shape else stats.mean
            s = stats.std[sl] if stats.per_shape else stats.std
            self.clouds[sl] -= m
            self.clouds[sl] /= s
        self._rng: np.random.Generator | None = None
        self._rng_key: object = ()

    def _load(self) -> np.ndarray:
        first = read_cloud(self.files[0])
        n = len(first)
        tr_pool, te_pool = _pool_sizes(n)
        if tr_pool < self.points or te_pool < self.eval_points:
            raise ValueError(
                f"{self.files[0]}: {n} points give pools of {tr_pool} (first 2/3) and {te_pool} (last 1/3) points, "
                f"fewer than points={self.points} / eval_points={self.eval_points}"
            )
        clouds = np.empty((len(self.files), n, 3), dtype=np.float32)
        clouds[0] = first
        for i, f in enumerate(self.files[1:], 1):
            x = read_cloud(f)
            if len(x) != n:
                raise ValueError(f"{f}: has {len(x)} points, but {self.files[0]} has {n}; all clouds must match")
            clouds[i] = x
        return clouds

    def __len__(self) -> int:
        return len(self.clouds)

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()  # each worker gets its own stream, seeded by the DataLoader's per-worker seed
        key = None if info is None else (info.id, info.seed)
        if self._rng is None or key != self._rng_key:
            extra = [] if info is None else [info.seed % 2**63]
            self._rng, self._rng_key = np.random.default_rng([self.seed, *extra]), key
        return self._rng

    def _take(self, pool: np.ndarray, n: int) -> Tensor:
        if self.random_subsample:
            idx = self._generator().choice(len(pool), n, replace=False)
            return torch.from_numpy(pool[idx])
        return torch.from_numpy(pool[:n].copy())

    def _shape_stats(self, idx: int) -> tuple[Tensor, Tensor]:
        i = idx if self.stats.per_shape else 0
        return torch.from_numpy(self.stats.mean[i].copy()), torch.from_numpy(self.stats.std[i].copy())

    def __getitem__(self, idx: int) -> dict:
        cloud = self.clouds[idx]
        mean, std = self._shape_stats(idx)
        return {
            "x": self._take(cloud[: self.train_pool], self.points),
            "test_points": self._take(cloud[self.train_pool :], self.eval_points),
            "mean": mean,
            "std": std,
            "idx": int(idx),
            "category": self.shape_categories[idx],
        }

    def reference_clouds(self, pool: str = "test", points: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic clouds for evaluation: the first ``points`` of each shape's ``pool``, normalised.

        Returns clouds (S, n, 3), mean (S, 1, 3) and std (S, 1, 1) or (S, 1, 3); ``clouds * std + mean``
        de-normalises.
        """
        if pool not in ("train", "test"):
            raise ValueError(f"unknown pool {pool!r}; choose 'train' or 'test'")
        start, size = (0, self.train_pool) if pool == "train" else (self.train_pool, self.test_pool)
        if not 1 <= points <= size:
            raise ValueError(f"points={points}, but the {pool} pool holds {size} points per shape")
        clouds = torch.from_numpy(self.clouds[:, start : start + points].copy())
        s = len(self.clouds)
        mean = torch.from_numpy(np.broadcast_to(self.stats.mean, (s, 1, 3)).copy())
        std = torch.from_numpy(np.broadcast_to(self.stats.std, (s, 1, self.stats.std.shape[-1])).copy())
        return clouds, mean, std
