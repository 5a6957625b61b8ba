"""ShapeNetCore.v2.PC15k point clouds (PointFlow's data) and converters from meshes and voxel grids.

The PC15k layout is ``<root>/<synset>/{train,val,test}/<id>.npy``, each file a float (15000, 3) cloud sampled
on one ShapeNet surface. As in PointFlow's ``Uniform15KPC``, the first two thirds of a cloud (10,000 of 15,000
points) are its *training pool* and the last third (5,000) its *test pool*; items subsample ``tr_points`` from
the first and ``te_points`` from the second.

Meshes in the ModelNet layout (``<root>/<category>/{train,test}/*.off``) and occupancy grids (an ``.npz`` with
``voxels``, like ``data/shapes/*.npz``) are converted once into the same layout (:func:`convert_to_pc15k`) and
then read with :class:`PC15kDataset`, so every source goes through one loader.

Memory: clouds are held in memory as float32, 180 kB per shape (the train split of PC15k airplanes,
2,832 shapes, is about 0.5 GB; all 6,778 chairs would be 1.2 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm.auto import tqdm

from core.paths import REPO_ROOT, resolve_path

__all__ = [
    "SHAPENET_CATEGORIES",
    "SPLITS",
    "NORMALIZE_MODES",
    "resolve_categories",
    "category_folder",
    "load_cloud",
    "NormStats",
    "PC15kDataset",
    "convert_to_pc15k",
    "conversion_info",
    "PointCloudDataModule",
]

DEFAULT_CACHE_DIR = REPO_ROOT / "data" / "cache" / "pointflow"

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
SOURCES = ("pc15k", "mesh", "voxel")
MESH_SUFFIXES = (".off", ".obj", ".ply")
_SPLIT_SEED = 2019  # fixed, so the train/val/test membership does not depend on the sampling seed
_CONVERT_VERSION = 1  # bump when the converters' output changes, to invalidate old caches


# ----------------------------------------------------------------------------------------------- categories


def _known_names() -> str:
    return ", ".join(sorted(SHAPENET_CATEGORIES))


def _split_entries(categories: str | Sequence[str]) -> list[str]:
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
    for entry in _split_entries(categories):
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
    for entry in _split_entries(categories):
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


def load_cloud(path: str | Path, min_points: int = 0) -> np.ndarray:
    """One PC15k cloud: a ``.npy`` float array (P, 3), P >= ``min_points``, returned as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point cloud file {path} does not exist")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt file, pickled object array, not an .npy at all
        raise ValueError(f"{path}: not a readable .npy array of points ({type(e).__name__}: {e})") from e
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{path}: expected a single .npy array of shape (P, 3), found {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{path}: expected shape (P, 3), found {x.shape}")
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"{path}: expected float16/32/64 coordinates, found dtype {x.dtype}")
    if len(x) < min_points:
        raise ValueError(f"{path}: expected at least {min_points} points, found {len(x)}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(
            f"{path}: point {int(np.argmax(bad))} is not finite (NaN or inf; {int(bad.sum())} such points)"
        )
    return x.astype(np.float32, copy=False)


def _pool_sizes(n_points: int) -> tuple[int, int]:
    """(training pool, test pool) sizes of a cloud: first two thirds, last third (10,000 / 5,000 for PC15k)."""
    n_test = n_points // 3
    return n_points - n_test, n_test


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
        tr_points / te_points: points per item from the training / test pool.
        normalize: ``global``, ``shape``, ``axis`` or ``none`` (see :class:`NormStats`).
        stats: the train split's stats, for val/test under ``global``/``axis``; under ``shape``/``none`` the
            stats depend on each shape only and are computed here.
        random_subsample: new random points (without replacement) every call, else the first points of the pool.
        seed: seeds the subsampling; in DataLoader workers it is combined with the worker's seed.
        max_shapes: the first ``max_shapes`` files (sorted by name) of each category, for quick runs.

    Items are dicts: ``x`` (tr_points, 3), ``test_points`` (te_points, 3), ``mean`` (1, 3), ``std`` (1, 1) or
    (1, 3) (all float32; ``x * std + mean`` is in the file's coordinates), ``idx`` (int), ``category`` (folder).
    """

    def __init__(
        self,
        root: str | Path,
        categories: str | Sequence[str] = "airplane",
        split: str = "train",
        tr_points: int = 2048,
        te_points: int = 2048,
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
        if tr_points < 1 or te_points < 1:
            raise ValueError(f"tr_points and te_points must be positive, found {tr_points} and {te_points}")
        if max_shapes is not None and max_shapes < 1:
            raise ValueError(f"max_shapes must be positive or None, found {max_shapes}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"point cloud root {self.root} does not exist (expected <root>/<synset>/{split}/)")
        self.split, self.normalize = split, normalize
        self.tr_points, self.te_points = tr_points, te_points
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
        first = load_cloud(self.files[0])
        n = len(first)
        tr_pool, te_pool = _pool_sizes(n)
        if tr_pool < self.tr_points or te_pool < self.te_points:
            raise ValueError(
                f"{self.files[0]}: {n} points give pools of {tr_pool} (first 2/3) and {te_pool} (last 1/3) points, "
                f"fewer than tr_points={self.tr_points} / te_points={self.te_points}"
            )
        clouds = np.empty((len(self.files), n, 3), dtype=np.float32)
        clouds[0] = first
        for i, f in enumerate(self.files[1:], 1):
            x = load_cloud(f)
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
            "x": self._take(cloud[: self.train_pool], self.tr_points),
            "test_points": self._take(cloud[self.train_pool :], self.te_points),
            "mean": mean,
            "std": std,
            "idx": int(idx),
            "category": self.shape_categories[idx],
        }

    def reference_clouds(self, pool: str = "test", n_points: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic clouds for evaluation: the first ``n_points`` of each shape's ``pool``, normalised.

        Returns clouds (S, n, 3), mean (S, 1, 3) and std (S, 1, 1) or (S, 1, 3); ``clouds * std + mean``
        de-normalises.
        """
        if pool not in ("train", "test"):
            raise ValueError(f"unknown pool {pool!r}; choose 'train' or 'test'")
        start, size = (0, self.train_pool) if pool == "train" else (self.train_pool, self.test_pool)
        if not 1 <= n_points <= size:
            raise ValueError(f"n_points={n_points}, but the {pool} pool holds {size} points per shape")
        clouds = torch.from_numpy(self.clouds[:, start : start + n_points].copy())
        s = len(self.clouds)
        mean = torch.from_numpy(np.broadcast_to(self.stats.mean, (s, 1, 3)).copy())
        std = torch.from_numpy(np.broadcast_to(self.stats.std, (s, 1, self.stats.std.shape[-1])).copy())
        return clouds, mean, std


# ----------------------------------------------------------------------------------------------- conversion


def _split_indices(n: int, val: float, test: float, rng_seed: int = _SPLIT_SEED) -> dict[str, list[int]]:
    """Deterministic split of ``range(n)`` by a fixed permutation; val/test get at least one item when n allows."""
    k = (val > 0) + (test > 0)  # a train item must remain
    n_val = max(1, round(val * n)) if val > 0 and n > k else 0
    n_test = max(1, round(test * n)) if test > 0 and n > k else 0
    perm = np.random.default_rng(rng_seed).permutation(n)
    return {
        "train": sorted(perm[n_test + n_val :].tolist()),
        "val": sorted(perm[n_test : n_test + n_val].tolist()),
        "test": sorted(perm[:n_test].tolist()),
    }


def _shape_seed(seed: int, *keys: str) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(keys).encode())) % 2**31


def _sample_triangles(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform (by area) on a triangle mesh."""
    tri = verts[faces]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = area.sum()
    if not total > 0:
        raise ValueError("surface has zero area")
    pick = rng.choice(len(tri), n, p=area / total)
    u, v = rng.random((2, n, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    t = tri[pick]
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def _load_voxels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"voxel file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "voxels" not in z.files:
                raise ValueError(f"{path}: no array 'voxels' (found {', '.join(z.files) or 'none'})")
            v = z["voxels"]
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if v.ndim == 5 and v.shape[1] == 1:
        v = v[:, 0]
    if v.ndim != 4 or min(v.shape[1:], default=0) < 1 or len(v) == 0:
        raise ValueError(f"{path}: 'voxels' must have shape (N, 1, D, D, D) or (N, D, D, D), found {v.shape}")
    if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
        raise ValueError(f"{path}: 'voxels' must be numeric occupancy, found dtype {v.dtype}")
    return v


def _to_y_up(points: np.ndarray, up_axis: int) -> np.ndarray:
    """Rotate (N, 3) points so that axis ``up_axis`` becomes y (axis 1), keeping a right-handed frame."""
    if up_axis == 1:
        return points
    if up_axis == 2:  # (x, y, z) -> (x, z, -y): a rotation of -90 degrees about x
        return np.stack([points[:, 0], points[:, 2], -points[:, 1]], 1)
    return np.stack([-points[:, 1], points[:, 0], points[:, 2]], 1)  # x up: rotate +90 degrees about z


def _voxel_surface(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of the 0.5 iso-surface of an occupancy grid, in the grid's unit cube centred at 0."""
    from skimage.measure import marching_cubes

    g = np.pad(np.asarray(grid, dtype=np.float32), 1)
    if not g.max() > 0.5:
        raise ValueError("grid is empty (no voxel above 0.5)")
    verts, faces, _, _ = marching_cubes(g, level=0.5)
    dims = np.array(grid.shape, dtype=np.float64)
    scale = dims.max()
    # padded index p is voxel p - 1, whose centre lies at p - 0.5 on a [0, D] axis; centre the cube at 0
    return (verts - 0.5) / scale - dims / (2 * scale), faces


def _read_off_fallback(path: Path):
    """A triangle mesh from an OFF file open3d refuses (ModelNet's ``OFF<n> <m> 0`` header on one line)."""
    import open3d as o3d

    words = path.read_text(errors="replace").split()
    if not words or not words[0].startswith("OFF"):
        return None
    head = ([words[0][3:]] if len(words[0]) > 3 else []) + words[1:]
    try:
        nv, nf = int(head[0]), int(head[1])
        nums = head[3:]
        verts = np.array(nums[: 3 * nv], dtype=np.float64).reshape(nv, 3)
        faces, pos = [], 3 * nv
        for _ in range(nf):
            k = int(nums[pos])
            idx = [int(t) for t in nums[pos + 1 : pos + 1 + k]]
            faces += [(idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1)]  # fan-triangulate polygons
            pos += 1 + k
    except (ValueError, IndexError):
        return None
    mesh = o3d.geometry.TriangleMesh()
    mesh.vertices = o3d.utility.Vector3dVector(verts)
    mesh.triangles = o3d.utility.Vector3iVector(np.array(faces, dtype=np.int32).reshape(-1, 3))
    return mesh


def _mesh_points(path: Path, n: int, seed: int) -> np.ndarray:
    import open3d as o3d

    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        mesh = o3d.io.read_triangle_mesh(str(path))
    if len(mesh.triangles) == 0 and path.suffix.lower() == ".off":
        mesh = _read_off_fallback(path) or mesh
    if len(mesh.triangles) == 0:
        raise ValueError(f"{path}: no triangles could be read (unreadable or empty mesh)")
    verts = np.asarray(mesh.vertices)
    tris = np.asarray(mesh.triangles)
    if not np.isfinite(verts).all() or tris.min() < 0 or tris.max() >= len(verts):
        raise ValueError(f"{path}: mesh has non-finite vertices or triangle indices out of range")
    if not mesh.get_surface_area() > 0:
        raise ValueError(f"{path}: mesh has zero surface area")
    o3d.utility.random.seed(seed)
    points = np.asarray(mesh.sample_points_uniformly(number_of_points=n).points)
    if points.shape != (n, 3) or not np.isfinite(points).all():
        raise ValueError(f"{path}: sampling {n} points failed (got {points.shape})")
    return points


def _mesh_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)


def _mesh_category_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"{root} holds no category folders (expected <category>/{{train,test}}/*.off)")
    return dirs


def _mesh_jobs(cat_dir: Path, max_shapes: int | None) -> dict[str, list[Path]]:
    """Meshes per split: ModelNet's train/test (val = 10 % of train), or 80/10/10 of meshes directly in the folder."""
    if (cat_dir / "train").is_dir() or (cat_dir / "test").is_dir():
        train = _mesh_files(cat_dir / "train")[:max_shapes] if (cat_dir / "train").is_dir() else []
        test = _mesh_files(cat_dir / "test")[:max_shapes] if (cat_dir / "test").is_dir() else []
        parts = _split_indices(len(train), 0.1, 0.0)
        jobs = {"train": [train[i] for i in parts["train"]], "val": [train[i] for i in parts["val"]], "test": test}
    else:
        files = _mesh_files(cat_dir)[:max_shapes]
        parts = _split_indices(len(files), 0.1, 0.1)
        jobs = {s: [files[i] for i in parts[s]] for s in SPLITS}
    if not any(jobs.values()):
        raise ValueError(f"no meshes ({', '.join(MESH_SUFFIXES)}) in {cat_dir}, {cat_dir}/train or {cat_dir}/test")
    for split, files in jobs.items():
        stems = [f.stem for f in files]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise ValueError(f"{cat_dir}: several meshes share the name(s) {', '.join(dup)} in split {split}")
    return jobs


def _fingerprint(files: Sequence[Path]) -> list:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _write_category(
    out_root: Path, folder: str, settings: dict, jobs: dict[str, list], sample, progress: bool
) -> dict[str, int]:
    """Write one category folder unless a matching completion marker exists; returns counts per split."""
    digest = _settings_hash(settings)
    marker = out_root / f".complete-{folder}-{digest}"
    if marker.is_file():
        return json.loads(marker.read_text())["counts"]
    cat_dir, claim = out_root / folder, out_root / f".converting-{folder}"
    ours = claim.exists() or any(out_root.glob(f".complete-{folder}-*"))
    if not ours and any(cat_dir.glob("*/*.npy")):
        raise FileExistsError(
            f"{cat_dir} already holds point clouds not written by convert_to_pc15k; choose another output folder"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    claim.touch()
    for old in out_root.glob(f".complete-{folder}-*"):
        old.unlink()
    for split in SPLITS:  # remove what an earlier (other settings or interrupted) conversion left
        (cat_dir / split).mkdir(parents=True, exist_ok=True)
        for f in (cat_dir / split).glob("*.npy"):
            f.unlink()
    total = sum(len(v) for v in jobs.values())
    with tqdm(total=total, desc=f"converting {folder}", unit="shape", disable=not progress) as bar:
        for split, items in jobs.items():
            for name, item in items:
                points = sample(split, name, item).astype(np.float32)
                np.save(cat_dir / split / f"{name}.npy", points)
                bar.update()
    counts = {s: len(jobs[s]) for s in SPLITS}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({**settings, "folder": folder, "counts": counts}, indent=1))
    os.replace(tmp, marker)  # the marker is written last: an interrupted conversion is redone, never half-used
    claim.unlink()
    return counts


def convert_to_pc15k(
    source: str,
    path: str | Path,
    out_root: str | Path,
    category: str | None = None,
    points: int = 15000,
    seed: int = 0,
    max_shapes: int | None = None,
    progress: bool = True,
    voxel_up_axis: int = 2,
) -> Path:
    """Convert meshes or voxel grids into the PC15k layout ``<out_root>/<synset-or-name>/{train,val,test}/<id>.npy``.

    ``source="mesh"``: ``path`` is a ModelNet-layout folder ``<category>/{train,test}/*.{off,obj,ply}`` (or
    meshes directly under ``<category>/``, split 80/10/10); each mesh is sampled uniformly on its surface with
    open3d; val is a fixed 10 % of train. ``category`` picks one category folder (default: all).

    ``source="voxel"``: ``path`` is an ``.npz`` with ``voxels`` (N, 1, D, D, D) or (N, D, D, D); the surface
    (marching cubes at 0.5 on the zero-padded grid) is sampled uniformly by area, in the grid's unit cube
    centred at 0; split 80/10/10 by a fixed permutation of the index; files are named by index (``00017.npy``).
    ``category`` names it (default: the file's stem). The grid axis ``voxel_up_axis`` (2 for binvox/ModelNet
    grids, which are z-up) becomes y, so the clouds are y-up like ShapeNet's (a right-handed rotation).

    A category whose folder is a ShapeNet name is written under its synset id. Work is skipped when a
    completion marker ``<out_root>/.complete-<folder>-<hash of settings and input>`` exists; ``max_shapes``
    keeps the first shapes (per category and source split for meshes). Returns ``out_root``.
    """
    if source not in ("mesh", "voxel"):
        raise ValueError(f"unknown conversion source {source!r}; choose 'mesh' or 'voxel'")
    if points < 3:
        raise ValueError(f"points must be at least 3, found {points}")
    if max_shapes is not None and max_shapes < 1:
        raise ValueError(f"max_shapes must be positive or None, found {max_shapes}")
    path, out_root = Path(path).resolve(), Path(out_root)
    common = {"version": _CONVERT_VERSION, "source": source, "input": str(path), "points": points, "seed": seed}
    common["max_shapes"] = max_shapes

    if source == "voxel":
        name = category if category is not None else path.stem
        folder = category_folder(name)
        if not path.is_file():
            raise FileNotFoundError(f"voxel file {path} does not exist")
        if voxel_up_axis not in (0, 1, 2):
            raise ValueError(f"voxel_up_axis must be 0, 1 or 2, found {voxel_up_axis}")
        settings = {**common, "category": name, "files": _fingerprint([path]), "up_axis": voxel_up_axis}
        marker = out_root / f".complete-{folder}-{_settings_hash(settings)}"
        if marker.is_file():
            return out_root
        voxels = _load_voxels(path)[:max_shapes]
        parts = _split_indices(len(voxels), 0.1, 0.1)
        jobs = {s: [(f"{i:05d}", i) for i in parts[s]] for s in SPLITS}

        def sample(split: str, name_: str, i: int) -> np.ndarray:
            try:
                verts, faces = _voxel_surface(voxels[i])
                pts = _sample_triangles(verts, faces, points, np.random.default_rng([seed, i]))
                return _to_y_up(pts, voxel_up_axis)
            except ValueError as e:
                raise ValueError(f"{path}: voxels[{i}]: {e}") from e

        _write_category(out_root, folder, settings, jobs, sample, progress)
        return out_root

    if not path.is_dir():
        raise FileNotFoundError(f"mesh folder {path} does not exist (expected <category>/{{train,test}}/*.off)")
    if category is not None:
        cat_dirs = [path / category]
        if not cat_dirs[0].is_dir():
            raise FileNotFoundError(f"category folder {cat_dirs[0]} does not exist")
    else:
        cat_dirs = _mesh_category_dirs(path)
    for cat_dir in cat_dirs:
        folder = category_folder(cat_dir.name)
        jobs_files = _mesh_jobs(cat_dir, max_shapes)
        files = [f for fs in jobs_files.values() for f in fs]
        settings = {**common, "category": cat_dir.name, "files": _fingerprint(files)}
        jobs = {s: [(f.stem, f) for f in fs] for s, fs in jobs_files.items()}

        def sample(split: str, name_: str, f: Path, _folder: str = folder) -> np.ndarray:
            return _mesh_points(f, points, _shape_seed(seed, _folder, split, name_))

        _write_category(out_root, folder, settings, jobs, sample, progress)
    return out_root


def conversion_info(out_root: str | Path) -> list[dict]:
    """The completed conversions in ``out_root`` (settings, ``folder`` and ``counts`` per split), by folder."""
    out = []
    for marker in sorted(Path(out_root).glob(".complete-*")):
        if marker.suffix == ".tmp":
            continue
        info = json.loads(marker.read_text())
        info.pop("files", None)
        out.append({**info, "marker": str(marker), "mtime": marker.stat().st_mtime})
    return out


# ----------------------------------------------------------------------------------------------- datamodule



class PointCloudDataModule(pl.LightningDataModule):
    """PC15k train/val/test sets of some categories, from a PC15k tree or converted meshes / voxel grids.

    ``source="pc15k"`` reads ``root`` directly; ``mesh`` and ``voxel`` convert ``root`` once (in
    :meth:`prepare_data`) into ``cache_dir`` (default ``data/cache/pointflow/`` in the repository). Val and test
    use the train split's stats and the first points of each pool (no random subsampling).
    """

    def __init__(
        self,
        root: str,
        source: str = "pc15k",
        categories: str | Sequence[str] = "airplane",
        tr_points: int = 2048,
        te_points: int = 2048,
        normalize: str = "global",
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        max_shapes: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if source not in SOURCES:
            raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalisation {normalize!r}; choose one of {', '.join(NORMALIZE_MODES)}")
        self.root, self.source = str(root), source
        self.categories = [categories] if isinstance(categories, str) else [str(c) for c in categories]
        self.tr_points, self.te_points, self.normalize = tr_points, te_points, normalize
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed, self.max_shapes = seed, max_shapes
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
        self._convert_categories()  # fail early on a bad category list for a voxel file
        self._sets: dict[str, PC15kDataset] = {}

    @property
    def input_path(self) -> Path:
        """``root``, resolved against the repository root when it does not exist from the current directory."""
        return resolve_path(self.root)

    @property
    def data_root(self) -> Path:
        """The PC15k tree that is read: ``root`` itself, or the conversion's folder in the cache."""
        if self.source == "pc15k":
            return self.input_path
        src = self.input_path.resolve()
        key = _settings_hash({"input": str(src), "seed": self.seed, "max_shapes": self.max_shapes})[:10]
        return self.cache_dir / f"{self.source}-{src.stem}-{key}"

    def _convert_categories(self) -> list[str | None]:
        entries = _split_entries(self.categories)
        if self.source == "voxel":
            if len(entries) != 1 or entries[0].lower() == "all":
                raise ValueError(f"a voxel file holds one category; give its name, found categories={self.categories}")
            return entries
        return [None] if any(e.lower() == "all" for e in entries) else entries

    def prepare_data(self) -> None:
        """Convert a mesh folder or voxel file into the cache (once; later calls find the completion marker)."""
        src = self.input_path
        if not src.exists():
            raise FileNotFoundError(f"data root {self.root} does not exist (also tried {REPO_ROOT / self.root})")
        if self.source == "pc15k":
            return
        for cat in self._convert_categories():
            convert_to_pc15k(self.source, src, self.data_root, cat, seed=self.seed, max_shapes=self.max_shapes)

    def _dataset_categories(self) -> list[str]:
        if self.source == "pc15k":
            return self.categories
        cats = self._convert_categories()
        if cats == [None]:
            return [category_folder(p.name) for p in _mesh_category_dirs(self.input_path)]
        return [category_folder(c) for c in cats]

    def _make(self, split: str, stats: NormStats | None) -> PC15kDataset:
        return PC15kDataset(
            self.data_root,
            self._dataset_categories(),
            split,
            tr_points=self.tr_points,
            te_points=self.te_points,
            normalize=self.normalize,
            stats=stats,
            random_subsample=split == "train",
            seed=self.seed,
            max_shapes=self.max_shapes,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the train split (its stats normalise the others) and the splits ``stage`` needs."""
        needs = {"fit": ["val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in ["train", *needs.get(stage, ["val", "test"])]:  # stage None: all
            self._get(split)

    def _get(self, split: str) -> PC15kDataset:
        """The loaded split; loaded here (converting first if needed) when ``setup`` did not load it."""
        if split not in self._sets:
            if not self._sets and self.source != "pc15k":
                self.prepare_data()  # a no-op once converted; lets setup() work without a Trainer
            if split != "train" and "train" not in self._sets:
                self._sets["train"] = self._make("train", None)
            train_stats = self._sets["train"].stats if split != "train" else None
            stats = train_stats if self.normalize in ("global", "axis") else None
            self._sets[split] = self._make(split, stats)
        return self._sets[split]

    @property
    def train_set(self) -> PC15kDataset:
        return self._get("train")

    @property
    def val_set(self) -> PC15kDataset:
        return self._get("val")

    @property
    def test_set(self) -> PC15kDataset:
        return self._get("test")

    @property
    def stats(self) -> NormStats:
        """The train split's normalisation stats (per shape under ``normalize="shape"``)."""
        return self.train_set.stats

    def _loader(self, ds: PC15kDataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle and len(ds) > batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False)
