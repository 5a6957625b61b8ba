"""Meshes and voxel grids converted once into the PC15k layout, so that every source goes through one reader.

Meshes in the ModelNet layout (``<root>/<category>/{train,test}/*.off``) are sampled on their surface with open3d;
occupancy grids (an ``.npz`` with ``voxels``, like ``data/shapes/*.npz``) through marching cubes. The result is
``<out>/<synset-or-name>/{train,val,test}/<id>.npy`` (15,000 points each), read with
:class:`apps.pointflow.pc15k.PC15kDataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from apps.pointflow.pc15k import SPLITS, category_folder

__all__ = ["MESH_SUFFIXES", "convert_to_pc15k", "conversion_info", "mesh_category_dirs", "settings_hash"]

MESH_SUFFIXES = (".off", ".obj", ".ply")
_SPLIT_SEED = 2019  # fixed, so the train/val/test membership does not depend on the sampling seed
_CONVERT_VERSION = 1  # bump when the converters' output changes, to invalidate old caches


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


def mesh_category_dirs(root: Path) -> list[Path]:
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


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _write_category(
    out_root: Path, folder: str, settings: dict, jobs: dict[str, list], sample, progress: bool
) -> dict[str, int]:
    """Write one category folder unless a matching completion marker exists; returns counts per split."""
    digest = settings_hash(settings)
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
        marker = out_root / f".complete-{folder}-{settings_hash(settings)}"
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
        cat_dirs = mesh_category_dirs(path)
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
