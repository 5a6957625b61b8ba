"""Reading and writing single point clouds: ``.npy`` (N, 3), ``.ply``/``.pcd``/``.xyz`` via open3d."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["CLOUD_SUFFIXES", "read_cloud", "read_cloud_folder", "write_ply"]

CLOUD_SUFFIXES = (".npy", ".ply", ".pcd", ".xyz")


def read_cloud(path: str | Path) -> np.ndarray:
    """(N, 3) float32 points from one file; errors name the file and what was found."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point cloud {path} does not exist")
    if path.suffix == ".npy":
        pts = np.load(path)
        if not np.issubdtype(pts.dtype, np.floating):
            raise ValueError(f"{path}: expected float points, found dtype {pts.dtype}")
    elif path.suffix in (".ply", ".pcd", ".xyz"):
        import open3d as o3d

        pts = np.asarray(o3d.io.read_point_cloud(str(path)).points)
    else:
        raise ValueError(f"{path}: unsupported point-cloud format; use one of {', '.join(CLOUD_SUFFIXES)}")
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise ValueError(f"{path}: expected an (N, 3) point cloud, found shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{path}: contains NaN or infinite coordinates")
    return pts.astype(np.float32)


def read_cloud_folder(folder: str | Path, num_points: int, seed: int = 0) -> tuple[np.ndarray, list[Path]]:
    """All clouds of a folder (sorted by name), each subsampled to ``num_points``: (S, num_points, 3) and paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of point clouds")
    paths = sorted(p for p in folder.iterdir() if p.suffix in CLOUD_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no point clouds ({', '.join(CLOUD_SUFFIXES)}) found")
    rng = np.random.default_rng(seed)
    clouds = []
    for p in paths:
        pts = read_cloud(p)
        if len(pts) < num_points:
            raise ValueError(f"{p}: has {len(pts)} points, fewer than the {num_points} needed")
        clouds.append(pts[rng.choice(len(pts), num_points, replace=False)] if len(pts) > num_points else pts)
    return np.stack(clouds), paths


def write_ply(path: str | Path, points: np.ndarray) -> Path:
    """Write an (N, 3) cloud as binary PLY (open3d)."""
    import open3d as o3d

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    if not o3d.io.write_point_cloud(str(path), pc):
        raise OSError(f"open3d could not write {path}")
    return path
