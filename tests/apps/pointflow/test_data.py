"""PointFlow data: PC15k loading and normalisation, mesh and voxel conversion, the DataModule and the script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.pointflow.convert import convert_to_pc15k
from apps.pointflow.data import PointCloudDataModule
from apps.pointflow.io import read_cloud
from apps.pointflow.pc15k import SHAPENET_CATEGORIES, NormStats, PC15kDataset, resolve_categories

REPO = Path(__file__).resolve().parents[3]
CHAIRS = REPO / "data" / "shapes" / "modelnet10_chair_voxels32_dev.npz"
AIRPLANE, CHAIR = "02691156", "03001627"
P = 12000  # points per tiny cloud: pools of 8000 (first 2/3) and 4000 (last 1/3)
SIZES = {AIRPLANE: {"train": 4, "val": 2, "test": 2}, CHAIR: {"train": 3, "val": 1, "test": 2}}


def _cloud(rng: np.random.Generator) -> np.ndarray:
    scale = rng.uniform(0.5, 2.0, 3)
    return (rng.standard_normal((P, 3)) * scale + rng.uniform(-1, 1, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A PC15k tree of random clouds: two synsets, all three splits."""
    root = tmp_path_factory.mktemp("pc15k")
    rng = np.random.default_rng(0)
    for synset, splits in SIZES.items():
        for split, n in splits.items():
            (root / synset / split).mkdir(parents=True)
            for i in range(n):
                np.save(root / synset / split / f"{synset[-3:]}_{i:02d}.npy", _cloud(rng))
    return root


def _raw(root: Path, split: str, cats=(AIRPLANE, CHAIR)) -> np.ndarray:
    files = [f for c in cats for f in sorted((root / c / split).glob("*.npy"))]
    return np.stack([np.load(f).astype(np.float64) for f in files])


# ----------------------------------------------------------------------------------------------- categories


def test_resolve_categories_all_and_round_trip():
    every = resolve_categories("all")
    assert len(every) == 55 == len(set(every))
    for name, synset in SHAPENET_CATEGORIES.items():
        assert resolve_categories(name) == [synset] == resolve_categories(synset)
    assert resolve_categories(["Airplane", "03001627", "airplane"]) == [AIRPLANE, CHAIR]
    assert resolve_categories("airplane,chair") == [AIRPLANE, CHAIR]
    assert SHAPENET_CATEGORIES["car"] == "02958343"


def test_unknown_category_lists_known_names(tree):
    with pytest.raises(ValueError, match="spaceship") as e:
        resolve_categories(["chair", "spaceship"])
    assert "airplane" in str(e.value) and "washer" in str(e.value)
    with pytest.raises(ValueError, match="bookshelf"):
        PC15kDataset(tree, "spaceship")


# ----------------------------------------------------------------------------------------------- dataset


def test_item_shapes_and_dtypes(tree):
    ds = PC15kDataset(tree, ["airplane", "chair"], "train", points=64, eval_points=32)
    assert len(ds) == 7 and ds.categories == [AIRPLANE, CHAIR]
    item = ds[5]
    assert item["x"].shape == (64, 3) and item["x"].dtype == torch.float32
    assert item["test_points"].shape == (32, 3) and item["test_points"].dtype == torch.float32
    assert item["mean"].shape == (1, 3) and item["mean"].dtype == torch.float32
    assert item["std"].shape == (1, 1) and item["std"].dtype == torch.float32
    assert item["idx"] == 5 and isinstance(item["idx"], int)
    assert item["category"] == CHAIR and ds[0]["category"] == AIRPLANE


def _expected_stats(raw: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode == "global":  # PointFlow: mean per axis, one std of all coordinates flattened
        return raw.reshape(-1, 3).mean(0)[None, None], np.array(raw.ravel().std()).reshape(1, 1, 1)
    if mode == "axis":
        return raw.reshape(-1, 3).mean(0)[None, None], raw.reshape(-1, 3).std(0)[None, None]
    if mode == "shape":
        return raw.mean(1, keepdims=True), raw.reshape(len(raw), -1).std(1)[:, None, None]
    return np.zeros((1, 1, 3)), np.ones((1, 1, 1))


@pytest.mark.parametrize("mode", ["global", "shape", "axis", "none"])
def test_normalisation_modes(tree, mode):
    raw = _raw(tree, "train")
    mean, std = _expected_stats(raw, mode)
    ds = PC15kDataset(
        tree, "airplane,chair", "train", points=100, eval_points=50, normalize=mode, random_subsample=False
    )
    np.testing.assert_allclose(ds.stats.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.stats.std, std, rtol=1e-5)
    assert ds.stats.std.shape[-1] == (3 if mode == "axis" else 1)
    normed = (raw - mean) / std
    for i in (0, 6):
        item = ds[i]
        i_stats = i if mode == "shape" else 0
        np.testing.assert_allclose(item["mean"].numpy(), mean[i_stats], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(item["std"].numpy(), std[i_stats], rtol=1e-5)
        np.testing.assert_allclose(item["x"].numpy(), normed[i, :100], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(item["test_points"].numpy(), normed[i, 8000:8050], rtol=1e-4, atol=1e-5)
        back = item["x"] * item["std"] + item["mean"]
        np.testing.assert_allclose(back.numpy(), raw[i, :100], rtol=1e-4, atol=1e-4)
    if mode in ("global", "axis", "shape"):  # normalised training data is centred with unit spread
        assert abs(ds.clouds.mean()) < 1e-3


@pytest.mark.parametrize("mode", ["global", "axis", "shape"])
def test_val_and_test_use_train_stats(tree, mode):
    train = PC15kDataset(tree, ["airplane", "chair"], "train", normalize=mode)
    for split in ("val", "test"):
        ds = PC15kDataset(tree, ["airplane", "chair"], split, normalize=mode, stats=train.stats, random_subsample=False)
        raw = _raw(tree, split)
        if mode == "shape":  # per-shape stats are the shape's own in every split
            mean, std = _expected_stats(raw, "shape")
        else:
            mean, std = train.stats.mean, train.stats.std
            assert not np.allclose(mean, _expected_stats(raw, mode)[0])  # the split's own stats would differ
        np.testing.assert_allclose(ds.stats.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds.stats.std, std, rtol=1e-5)
        np.testing.assert_allclose(ds.clouds, (raw - mean) / std, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        PC15kDataset(tree, "airplane", "val", normalize="none", stats=train.stats)


def test_reference_clouds_deterministic(tree):
    ds = PC15kDataset(tree, ["airplane", "chair"], "test", normalize="shape")
    a, b = ds.reference_clouds("test", 300), ds.reference_clouds("test", 300)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    clouds, mean, std = a
    assert clouds.shape == (4, 300, 3) and mean.shape == (4, 1, 3) and std.shape == (4, 1, 1)
    np.testing.assert_allclose((clouds * std + mean).numpy(), _raw(tree, "test")[:, 8000:8300], rtol=1e-4, atol=1e-4)
    train_pool = ds.reference_clouds("train", 8000)[0]
    assert train_pool.shape == (4, 8000, 3)
    with pytest.raises(ValueError, match="4000"):
        ds.reference_clouds("test", 4001)
    g = PC15kDataset(tree, "airplane", "test", normalize="axis").reference_clouds(points=10)
    assert g[1].shape == (2, 1, 3) and g[2].shape == (2, 1, 3)


def test_random_subsampling(tree):
    ds = PC15kDataset(tree, "airplane", "train", points=256, eval_points=128, seed=1)
    a, b = ds[0], ds[0]
    assert not torch.equal(a["x"], b["x"]) and not torch.equal(a["test_points"], b["test_points"])
    pool = {tuple(r) for r in ds.clouds[0, :8000].tolist()}
    assert all(tuple(r) in pool for r in a["x"].tolist())  # only training-pool points ...
    assert len({tuple(r) for r in a["x"].tolist()}) == 256  # ... without repeats
    test_pool = {tuple(r) for r in ds.clouds[0, 8000:].tolist()}
    assert all(tuple(r) in test_pool for r in a["test_points"].tolist())
    fixed = PC15kDataset(tree, "airplane", "train", points=256, eval_points=128, random_subsample=False)
    assert torch.equal(fixed[0]["x"], fixed[0]["x"]) and torch.equal(
        fixed[0]["x"], torch.from_numpy(fixed.clouds[0, :256])
    )
    again = PC15kDataset(tree, "airplane", "train", points=256, eval_points=128, seed=1)
    assert torch.equal(again[0]["x"], a["x"])  # the seed fixes the sequence


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((P, 2), np.float32), r"\(N, 3\) point cloud, found shape \(12000, 2\)"),
        (np.zeros((2, P, 3), np.float32), "found"),
        (np.full((P, 3), np.nan, np.float32), "NaN"),
        (np.zeros((P, 3), np.int64), "int64"),
        (np.full((P, 3), 1e30, np.float32), "beyond"),
    ],
)
def test_bad_cloud_files_name_the_file(tree, tmp_path, bad, match):
    f = tmp_path / "bad_cloud.npy"
    np.save(f, bad)
    with pytest.raises(ValueError, match=match) as e:
        read_cloud(f)
    assert str(f) in str(e.value)
    root = tmp_path / "tree"  # the dataset reports it too
    (root / AIRPLANE / "train").mkdir(parents=True)
    np.save(root / AIRPLANE / "train" / "a.npy", np.load(next((tree / AIRPLANE / "train").glob("*.npy"))))
    np.save(root / AIRPLANE / "train" / "b_bad.npy", bad)
    with pytest.raises(ValueError, match="b_bad.npy"):
        PC15kDataset(root, "airplane")


def test_too_few_points_and_missing_or_empty_folders(tree, tmp_path):
    f = tmp_path / "small.npy"
    np.save(f, np.zeros((100, 3), np.float32))
    with pytest.raises(ValueError, match="small.npy"):
        read_cloud(f, min_points=15000)
    with pytest.raises(ValueError, match="eval_points=5000"):
        PC15kDataset(tree, "airplane", eval_points=5000)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PC15kDataset(tmp_path / "nowhere", "airplane")
    with pytest.raises(FileNotFoundError, match=CHAIR):
        PC15kDataset(tmp_path, "chair")
    (tmp_path / CHAIR / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / CHAIR / "train")):
        PC15kDataset(tmp_path, "chair")
    (tmp_path / CHAIR / "train").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / CHAIR / 'train'} holds no"):
        PC15kDataset(tmp_path, "chair")


def test_max_shapes_and_norm_stats_validation(tree):
    ds = PC15kDataset(tree, ["airplane", "chair"], "train", max_shapes=2)
    assert len(ds) == 4 and [f.name for f in ds.files[:2]] == ["156_00.npy", "156_01.npy"]
    with pytest.raises(ValueError, match="std > 0"):
        NormStats(np.zeros(3), np.zeros(1), "global")
    with pytest.raises(ValueError, match="unknown normalisation"):
        NormStats(np.zeros(3), np.ones(1), "minmax")


# ----------------------------------------------------------------------------------------------- mesh source


def _sphere(radius: float):
    import open3d as o3d

    return o3d.geometry.TriangleMesh.create_sphere(radius=radius, resolution=20)


def test_mesh_conversion_points_on_spheres(tmp_path):
    import open3d as o3d

    src = tmp_path / "ModelNet"
    radii = {"a": 0.5, "b": 1.5, "c": 0.8, "d": 1.0, "e": 2.0}
    for split in ("train", "test"):
        (src / "chair" / split).mkdir(parents=True)
    (src / "desk").mkdir()  # meshes directly under the category folder
    for name, ext, folder in [("a", "ply", "chair/train"), ("b", "off", "chair/train"), ("c", "obj", "chair/train")]:
        assert o3d.io.write_triangle_mesh(str(src / folder / f"{name}.{ext}"), _sphere(radii[name]))
    assert o3d.io.write_triangle_mesh(str(src / "chair" / "test" / "d.off"), _sphere(radii["d"]))
    for k in range(3):
        assert o3d.io.write_triangle_mesh(str(src / "desk" / f"e{k}.ply"), _sphere(radii["e"]))
    out = convert_to_pc15k("mesh", src, tmp_path / "out", points=3000, progress=False)
    counts = {}
    for folder in (CHAIR, "desk"):
        for split in ("train", "val", "test"):
            assert (out / folder / split).is_dir()
            files = sorted((out / folder / split).glob("*.npy"))
            counts[folder, split] = len(files)
            for f in files:
                x = np.load(f)
                assert x.shape == (3000, 3) and x.dtype == np.float32
                r = radii[f.stem[0]]
                assert np.abs(np.linalg.norm(x, axis=1) - r).max() < 0.01 * r, f
                assert (x.std(0) > 0.4 * r).all()  # spread over the sphere, not one patch
    before = _mtimes(out)
    convert_to_pc15k("mesh", src, tmp_path / "out", points=3000, progress=False)
    assert _mtimes(out) == before  # cached
    assert counts == {
        (CHAIR, "train"): 2,
        (CHAIR, "val"): 1,
        (CHAIR, "test"): 1,
        ("desk", "train"): 1,
        ("desk", "val"): 1,
        ("desk", "test"): 1,
    }


def test_mesh_errors_and_modelnet_off_header(tmp_path):
    src = tmp_path / "ModelNet"
    (src / "bed" / "train").mkdir(parents=True)
    cube = "\n".join(
        ["OFF8 6 0"]  # ModelNet's malformed header (keyword and counts on one line), which open3d rejects
        + [f"{x} {y} {z}" for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
        + ["4 0 1 3 2", "4 4 6 7 5", "4 0 4 5 1", "4 2 3 7 6", "4 0 2 6 4", "4 1 5 7 3"]
    )
    (src / "bed" / "train" / "cube.off").write_text(cube)
    out = convert_to_pc15k("mesh", src, tmp_path / "out", category="bed", points=500, progress=False)
    x = np.load(next((out / "02818832").glob("*/cube.npy")))
    assert np.allclose(np.abs(x).max(1), 1.0, atol=1e-6)  # every point on a face of the cube
    (src / "bed" / "train" / "broken.off").write_text("OFF\n3 1 0\n0 0 0\n")
    with pytest.raises(ValueError, match="broken.off"):
        convert_to_pc15k("mesh", src, tmp_path / "out2", points=500, progress=False)
    with pytest.raises(FileNotFoundError, match="sofa"):
        convert_to_pc15k("mesh", src, tmp_path / "out3", category="sofa", progress=False)


# ----------------------------------------------------------------------------------------------- voxel source


def _voxel_spheres(path: Path, n: int = 5, d: int = 24, r: float = 8.0) -> None:
    c = np.arange(d) + 0.5
    dist = np.sqrt((c[:, None, None] - d / 2) ** 2 + (c[None, :, None] - d / 2) ** 2 + (c[None, None, :] - d / 2) ** 2)
    np.savez_compressed(path, voxels=np.repeat((dist <= r).astype(np.uint8)[None, None], n, 0))


def _mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_voxel_sphere_conversion_deterministic_and_cached(tmp_path):
    vox = tmp_path / "spheres.npz"
    _voxel_spheres(vox)
    out = convert_to_pc15k("voxel", vox, tmp_path / "a", category="chair", points=2000, progress=False)
    files = sorted(out.glob(f"{CHAIR}/*/*.npy"))
    assert len(files) == 5 and {f.parent.name for f in files} == {"train", "val", "test"}
    for f in files:
        x = np.load(f)
        assert x.shape == (2000, 3) and x.dtype == np.float32
        assert np.abs(np.linalg.norm(x, axis=1) - 8 / 24).max() < 1 / 24  # within a voxel of the sphere
    before = _mtimes(out)
    convert_to_pc15k("voxel", vox, tmp_path / "a", category="chair", points=2000, progress=False)
    assert _mtimes(out) == before  # cached: nothing rewritten
    convert_to_pc15k("voxel", vox, tmp_path / "b", category="chair", points=2000, progress=False)
    for f in files:
        assert np.array_equal(np.load(f), np.load(tmp_path / "b" / f.relative_to(out)))
    convert_to_pc15k("voxel", vox, tmp_path / "a", category="chair", points=2000, seed=1, progress=False)
    assert not np.array_equal(np.load(files[0]), np.load(tmp_path / "b" / files[0].relative_to(out)))
    assert len(list(out.glob(".complete-*"))) == 1  # the old settings' marker is gone


def test_voxel_errors(tmp_path):
    np.savez(tmp_path / "nokey.npz", grids=np.zeros((2, 8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="nokey.npz.*'voxels'.*grids"):
        convert_to_pc15k("voxel", tmp_path / "nokey.npz", tmp_path / "o", progress=False)
    np.savez(tmp_path / "flat.npz", voxels=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"flat.npz.*\(2, 8, 8\)"):
        convert_to_pc15k("voxel", tmp_path / "flat.npz", tmp_path / "o", progress=False)
    np.savez(tmp_path / "empty.npz", voxels=np.zeros((2, 8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"empty.npz: voxels\[0\]"):
        convert_to_pc15k("voxel", tmp_path / "empty.npz", tmp_path / "o", progress=False)
    assert not list((tmp_path / "o").glob(".complete-*"))  # an interrupted conversion leaves no marker
    foreign = tmp_path / "foreign" / CHAIR / "train"
    foreign.mkdir(parents=True)
    np.save(foreign / "x.npy", np.zeros((10, 3), np.float32))
    _voxel_spheres(tmp_path / "ok.npz", n=2, d=8, r=3)
    with pytest.raises(FileExistsError, match="not written by convert_to_pc15k"):
        convert_to_pc15k("voxel", tmp_path / "ok.npz", tmp_path / "foreign", category="chair", progress=False)


def test_real_chairs_first_three(tmp_path):
    out = convert_to_pc15k("voxel", CHAIRS, tmp_path, category="chair", points=3000, max_shapes=3, progress=False)
    grids = np.load(CHAIRS)["voxels"][:3, 0]
    files = sorted(out.glob(f"{CHAIR}/*/*.npy"))
    assert len(files) == 3
    for f in files:
        g = np.pad(grids[int(f.stem)], 1)
        y_up = np.load(f).astype(np.float64)
        x = np.stack([y_up[:, 0], -y_up[:, 2], y_up[:, 1]], 1)  # undo the z-up -> y-up rotation
        assert np.abs(x).max() <= 0.5 + 1e-6
        p = (x + 0.5) * 32 + 0.5  # padded-grid index coordinates; the surface passes through mixed cells
        mixed = np.zeros(len(x), bool)
        for eps in (-1e-6, 1e-6):
            lo = np.floor(p + eps).astype(int)
            corners = np.stack([g[tuple((lo + np.array(o)).T)] for o in np.ndindex(2, 2, 2)])
            mixed |= corners.min(0) != corners.max(0)
        assert mixed.all(), f


# ----------------------------------------------------------------------------------------------- datamodule, script


def test_datamodule_end_to_end(tree):
    dm = PointCloudDataModule(str(tree), categories=["airplane", "chair"], points=128, eval_points=64, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 3  # 7 shapes, drop_last
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (2, 128, 3) and batch["test_points"].shape == (2, 64, 3)
    assert batch["mean"].shape == (2, 1, 3) and batch["std"].shape == (2, 1, 1) and batch["idx"].shape == (2,)
    assert len(batch["category"]) == 2
    val = next(iter(dm.val_dataloader()))
    assert val["x"].shape == (3, 128, 3)
    assert np.array_equal(dm.val_set.stats.mean, dm.train_set.stats.mean) and not dm.val_set.random_subsample
    assert torch.equal(val["x"], next(iter(dm.val_dataloader()))["x"])
    assert "test" not in dm._sets  # loaded by setup("test") or on first access
    dm.setup("test")
    test = next(iter(dm.test_dataloader()))
    assert test["x"].shape == (4, 128, 3) and torch.equal(test["mean"][0], dm.train_set[0]["mean"])


def test_datamodule_voxel_default_path_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the repository-relative default root works from any directory
    dm = PointCloudDataModule(
        "data/shapes/modelnet10_chair_voxels32_dev.npz",
        source="voxel",
        categories="chair",
        batch_size=1,
        eval_batch_size=1,
        max_shapes=3,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.data_root.parent == tmp_path / "cache" and (dm.data_root / CHAIR / "train").is_dir()
    assert next(iter(dm.train_dataloader()))["x"].shape == (1, 2048, 3)
    assert next(iter(dm.val_dataloader()))["category"] == [CHAIR]
    assert len(dm.test_set) == 1  # not loaded by setup("fit"): loaded on first access
    with pytest.raises(ValueError, match="one category"):
        PointCloudDataModule("x.npz", source="voxel", categories=["chair", "table"])


def test_script_help_and_conversion(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("pointflow_to_pc15k", REPO / "scripts" / "pointflow_to_pc15k.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--source", "--input", "--output", "--category", "--points", "--seed", "--max-shapes"):
        assert flag in text

    vox = tmp_path / "spheres.npz"
    _voxel_spheres(vox, n=10)
    cmd = [sys.executable, "-m", "scripts.pointflow_to_pc15k", "--source", "voxel", "--input", str(vox)]
    cmd += ["--output", str(tmp_path / "out"), "--category", "chair", "--points", "1500", "--quiet"]
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train 8, val 1, test 1" in proc.stdout and CHAIR in proc.stdout
    assert len(list((tmp_path / "out" / CHAIR / "train").glob("*.npy"))) == 8
    assert np.load(next((tmp_path / "out" / CHAIR / "test").glob("*.npy"))).shape == (1500, 3)
