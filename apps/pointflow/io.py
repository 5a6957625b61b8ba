"""Reading and writing point clouds: one cloud (``.npy`` (N, 3), ``.ply``/``.pcd``/``.xyz`` via open3d) and sets of
clouds as other point-cloud projects write them (a folder of clouds, or one ``.npy``/``.npz`` array (S, N, 3))."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "CLOUD_SUFFIXES",
    "MAX_ABS_COORDINATE",
    "check_coordinates",
    "read_cloud",
    "read_cloud_folder",
    "read_cloud_set",
    "is_cloud_set",
    "write_ply",
]

CLOUD_SUFFIXES = (".npy", ".ply", ".pcd", ".xyz")
# Coordinates beyond this are refused when read: no shape data set comes near it (ShapeNet and ModelNet are within
# ~1e3), and such values overflow the squared distances of the metrics or stall the CNF's solver ("underflow in dt").
MAX_ABS_COORDINATE = 1e6


def check_coordinates(points: np.ndarray, name: str, limit: float = MAX_ABS_COORDINATE) -> None:
    """Refuse NaN/inf and absurd coordinates (``|x| > limit``), naming ``name`` (a file) and the worst value."""
    finite = np.isfinite(points)
    if not finite.all():
        raise ValueError(f"{name}: contains NaN or infinite coordinates ({int((~finite).sum())} values)")
    worst = float(np.abs(points).max()) if points.size else 0.0
    if worst > limit:
        raise ValueError(
            f"{name}: coordinates up to {worst:.3g}, beyond {limit:.0e}: refused (wrong units or a corrupt file?)"
        )


def read_cloud(path: str | Path, min_points: int = 1) -> np.ndarray:
    """(N, 3) float32 points from one file, N >= ``min_points``: ``.npy`` (a float array, never a pickle) or
    ``.ply``/``.pcd``/``.xyz`` (open3d). NaN/inf or absurd coordinates are refused; errors name the file and what
    was found. The one reader of clouds: data sets (``pc15k``) and ``evaluate``/``reconstruct`` inputs alike."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point cloud {path} does not exist")
    if path.suffix == ".npy":
        try:
            pts = np.load(path, allow_pickle=False)
        except Exception as e:  # corrupt file, pickled object array, not an .npy at all
            raise ValueError(f"{path}: not a readable .npy array of points ({type(e).__name__}: {e})") from e
        if not isinstance(pts, np.ndarray):
            raise ValueError(f"{path}: expected a single .npy array of shape (N, 3), found {type(pts).__name__}")
        if not np.issubdtype(pts.dtype, np.floating):
            raise ValueError(f"{path}: expected float points, found dtype {pts.dtype}")
    elif path.suffix in (".ply", ".pcd", ".xyz"):
        import open3d as o3d

        pts = np.asarray(o3d.io.read_point_cloud(str(path)).points)
    else:
        raise ValueError(f"{path}: unsupported point-cloud format; use one of {', '.join(CLOUD_SUFFIXES)}")
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise ValueError(f"{path}: expected an (N, 3) point cloud, found shape {pts.shape}")
    if len(pts) < min_points:
        raise ValueError(f"{path}: expected at least {min_points} points, found {len(pts)}")
    check_coordinates(pts, str(path))
    return pts.astype(np.float32, copy=False)


def _subsample(pts: np.ndarray, points: int | None, rng: np.random.Generator, name: str) -> np.ndarray:
    if points is None or len(pts) == points:
        return pts
    if len(pts) < points:
        raise ValueError(f"{name}: has {len(pts)} points, fewer than the {points} needed")
    return pts[rng.choice(len(pts), points, replace=False)]


def read_cloud_folder(folder: str | Path, points: int | None, seed: int = 0) -> tuple[np.ndarray, list[Path]]:
    """All clouds of a folder (sorted by name), each subsampled to ``points`` (None: all must have the same count):
    (S, points, 3) and the paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of point clouds")
    paths = sorted(p for p in folder.iterdir() if p.suffix in CLOUD_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no point clouds ({', '.join(CLOUD_SUFFIXES)}) found")
    rng = np.random.default_rng(seed)
    clouds = [_subsample(read_cloud(p), points, rng, str(p)) for p in paths]
    sizes = sorted({len(c) for c in clouds})
    if len(sizes) > 1:
        raise ValueError(f"{folder}: clouds of different sizes ({sizes[0]}..{sizes[-1]} points); pass points=N")
    return np.stack(clouds), paths


def _array_from_file(path: Path, key: str | None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt file, pickled objects, not numpy at all
        raise ValueError(f"{path}: not a readable .npy/.npz array ({type(e).__name__}: {e})") from e
    if isinstance(data, np.ndarray):
        if key is not None:
            raise ValueError(f"{path}: a .npy file holds one array; ':{key}' applies to .npz archives only")
        return data
    with data:
        keys = list(data.files)
        if key is None:
            if len(keys) != 1:
                raise ValueError(f"{path}: holds the arrays {keys}; name one as {path}:<name>")
            key = keys[0]
        if key not in keys:
            raise ValueError(f"{path}: no array {key!r} (found {keys})")
        return data[key]


def is_cloud_set(path: str | Path) -> bool:
    """Whether ``path`` names a set of clouds (a folder holding clouds, a ``.npy``/``.npz`` file, optionally
    ``file.npz:key``), as opposed to a PC15k root (a folder of category folders)."""
    text = str(path)
    path = Path(text.rsplit(":", 1)[0] if ".npz:" in text else text)
    if path.is_dir():
        return any(p.suffix in CLOUD_SUFFIXES for p in path.iterdir())
    return path.suffix in (".npy", ".npz")


def read_cloud_set(source: str | Path, points: int | None = None, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A set of clouds (S, points, 3) float32 and a name per cloud, from what point-cloud papers write:

    - a folder of ``.npy``/``.ply``/``.pcd``/``.xyz`` clouds (names: the file stems);
    - one ``.npy`` array (S, N, 3), or (N, 3) for a single cloud;
    - one ``.npz`` archive holding one such array, or ``file.npz:<name>`` for one of several.

    Clouds with more than ``points`` points are subsampled (without replacement, seeded); fewer is an error.
    NaN/inf and absurd coordinates (beyond :data:`MAX_ABS_COORDINATE`) are refused with the file named.
    """
    text = str(source)
    key = None
    if ".npz:" in text:
        text, key = text.rsplit(":", 1)
    path = Path(text)
    if path.is_dir():
        clouds, paths = read_cloud_folder(path, points, seed)
        return clouds, [p.stem for p in paths]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folder of clouds or .npy/.npz file")
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"{path}: expected a folder of clouds or a .npy/.npz array of shape (S, N, 3)")
    arr = _array_from_file(path, key)
    name = f"{path}:{key}" if key else str(path)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ValueError(f"{name}: expected an array of clouds (S, N, 3) or one cloud (N, 3), found shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected float coordinates, found dtype {arr.dtype}")
    check_coordinates(arr, name)
    rng = np.random.default_rng(seed)
    arr = np.stack([_subsample(c, points, rng, f"{name}[{i}]") for i, c in enumerate(arr)])
    return arr.astype(np.float32), [f"{path.stem}_{i:04d}" for i in range(len(arr))]


def write_ply(path: str | Path, points: np.ndarray) -> Path:
    """Write an (N, 3) cloud as binary little-endian PLY, float32 x, y, z (what open3d, MeshLab and Blender read).
    Written directly, so that sampling needs no open3d (a GPU server often lacks its OpenGL libraries)."""
    pts = np.ascontiguousarray(points, dtype="<f4")
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"write_ply {path}: expected an (N, 3) cloud, got shape {pts.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"ply\nformat binary_little_endian 1.0\nelement vertex {len(pts)}\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(pts.tobytes())
    return path
