"""PointFlow commands: train, sample, reconstruct, evaluate. Each takes the composed Hydra config.

Evaluation follows the reference's ``test.py`` (stevenygd/PointFlow): the reference set is the ``val`` split of the
data (the reference builds its "test" loader with ``split='val'``), one generated shape per reference shape,
de-normalised with that shape's statistics; MMD/COV/1-NNA use Chamfer and the approxmatch EMD; reconstruction is
averaged over the whole split with the exact EMD (the reference's ``EMD_CD``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from apps.pointflow import metrics as M
from apps.pointflow.data import PointCloudDataModule
from apps.pointflow.io import CLOUD_SUFFIXES, is_cloud_set, read_cloud, read_cloud_folder, read_cloud_set, write_ply
from apps.pointflow.plots import render_clouds
from core.metrics import nats_to_bits_per_dim
from core.training import Restored, fit, restore
from core.training.reporting import print_metrics, resolve_device
from core.training.runner import write_json

log = logging.getLogger(__name__)

# The model's solver sees normalised coordinates; beyond this many data standard deviations an input is refused
# (1e30 ends in torchdiffeq's "underflow in dt" assertion after minutes of solving).
MAX_NORMALISED_COORDINATE = 1e3


def train(cfg: DictConfig) -> dict:
    """Fit PointFlow; writes checkpoints, metrics.json and final renders (samples.png, samples/*.ply)."""
    result = fit(cfg)
    if result.trainer.is_global_zero and cfg.get("render_after_fit", True):
        module = result.module.cpu().eval()
        model = module.eval_model
        with torch.no_grad():
            if model.latent is not None:
                _, x = model.sample(8, result.datamodule.eval_points)
                x = module.denormalize(x).numpy()
                for i, pts in enumerate(x):
                    write_ply(result.output_dir / "samples" / f"sample_{i:04d}.ply", pts)
                log.info("renders: %s", render_clouds(list(x), result.output_dir / "samples.png"))
    return result.metrics


def _restore(cfg: DictConfig, data: dict | None = None) -> Restored:
    """The checkpoint's module, config and datamodule, with ``data.*`` of the command line (and ``data``) merged."""
    overrides = OmegaConf.to_container(OmegaConf.create(cfg.get("data") or {}), resolve=True)
    overrides.update(data or {})
    return restore(cfg.ckpt, {"data": overrides}, app=cfg.app, map_location=resolve_device(cfg.get("device")))


def _points(cfg: DictConfig, restored: Restored | None) -> int | None:
    """Points per cloud: ``points=`` if given, else the checkpoint's evaluation clouds (``data.eval_points``)."""
    if cfg.get("points") is not None:
        return int(cfg.points)
    return int(restored.cfg.data.eval_points) if restored is not None else None


def sample(cfg: DictConfig) -> Path:
    """``n`` new shapes from a checkpoint: samples/*.ply, samples.npy (n, points, 3) in data units, samples.png."""
    restored = _restore(cfg)
    module, points = restored.module, _points(cfg, restored)
    torch.manual_seed(cfg.seed)
    model, out = module.eval_model, Path(cfg.output_dir)
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, cfg.n, cfg.batch_size), desc="sampling", unit="batch"):
            b = min(cfg.batch_size, cfg.n - start)
            _, x = model.sample(b, points, cfg.temperature, cfg.latent_temperature)
            chunks.append(module.denormalize(x).cpu().numpy())
    x = np.concatenate(chunks)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", x)
    for i, pts in enumerate(x):
        write_ply(out / "samples" / f"sample_{i:04d}.ply", pts)
    render_clouds(list(x[:16]), out / "samples.png", [f"sample {i}" for i in range(min(16, len(x)))])
    log.info("wrote %d shapes to %s (samples.npy, samples/*.ply, samples.png)", len(x), out)
    return out / "samples.npy"


def _split_set(dm: PointCloudDataModule, split: str):
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}: choose train, val (the reference's evaluation set) or test")
    return {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]


def _check_normalised(x: torch.Tensor, names: list[str]) -> None:
    """Refuse clouds whose normalised coordinates are absurd for the model, naming the first such file."""
    worst = x.abs().flatten(1).amax(1)  # (S,)
    bad = (worst > MAX_NORMALISED_COORDINATE).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{names[i]}: coordinates {float(worst[i]):.3g} training-data standard deviations from the data's mean "
            f"(limit {MAX_NORMALISED_COORDINATE:.0e}); the model cannot reconstruct it: are the units right? "
            f"({len(bad)} such clouds)"
        )


def reconstruct(cfg: DictConfig) -> dict:
    """Auto-encode clouds: ``input`` = ``val`` (default, the reference's evaluation split) / ``test`` / ``train`` of
    the training data, a cloud file, or a folder of clouds.

    As the reference's ``evaluate_recon``: each shape's training points go in, as many points come out as its
    held-out test points hold, and CD and EMD (exact assignment, ``emd=exact``) between the two are averaged over
    the whole split (``max_shapes`` limits it), in data units. Writes reconstructions/*.ply, a PNG of inputs above
    reconstructions, and metrics.json (split, sizes, EMD method, per-shape CD)."""
    restored = _restore(cfg)
    module, out = restored.module, Path(cfg.output_dir)
    device, model = module.device, module.eval_model
    torch.manual_seed(cfg.seed)
    points = _points(cfg, restored)
    if cfg.input in ("train", "val", "test"):
        ds = _split_set(restored.datamodule, cfg.input)
        n = min(len(ds), cfg.max_shapes or len(ds))
        items = [ds[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(it["x"]) for it in items])
        ref = torch.stack([torch.as_tensor(it["test_points"]) for it in items])
        mean = torch.stack([torch.as_tensor(it["mean"]) for it in items])
        std = torch.stack([torch.as_tensor(it["std"]) for it in items])
        names = [f"{cfg.input}_{ds.files[i].stem}" for i in range(n)]
        source = {"split": cfg.input, "data_root": str(restored.datamodule.data_root)}
    else:
        path = Path(cfg.input)
        if path.is_dir():
            clouds, paths = read_cloud_folder(path, points, cfg.seed)
        elif path.suffix in CLOUD_SUFFIXES:
            pts = read_cloud(path)
            idx = np.random.default_rng(cfg.seed).choice(len(pts), min(points, len(pts)), replace=False)
            clouds, paths = pts[idx][None], [path]
        else:
            raise ValueError(f"input={cfg.input}: expected a point-cloud file, a folder of them, val, test or train")
        raw = torch.as_tensor(clouds)
        mean, std = module.data_mean.cpu().expand(len(raw), 1, 3), module.data_std.cpu().expand(len(raw), 1, 3)
        x = (raw - mean) / std  # into the model's normalised units
        _check_normalised(x, [str(p) for p in paths])
        ref, names = x, [p.stem for p in paths]
        source = {"split": None, "input": str(path)}
    recons = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x), cfg.batch_size), desc="reconstructing", unit="batch"):
            recons.append(model.reconstruct(x[i : i + cfg.batch_size].to(device), ref.shape[1]).cpu())
    recon = torch.cat(recons) * std + mean
    ref_d, x_d = ref * std + mean, x * std + mean
    cd = M.chamfer_distance(recon, ref_d)
    result = {**source, "n": len(x), "points": ref.shape[1], "CD": float(cd.mean()), "emd_method": cfg.emd}
    if cfg.emd != "none":
        result["EMD"] = float(_emd_fn(cfg.emd)(ref_d, recon).mean())
    out.mkdir(parents=True, exist_ok=True)
    for name, pts in zip(names, recon.numpy()):
        write_ply(out / "reconstructions" / f"{name}.ply", pts)
    k = min(8, len(x))
    render_clouds(
        list(x_d[:k].numpy()) + list(recon[:k].numpy()),
        out / "reconstructions.png",
        [f"input {n}" for n in names[:k]] + [f"recon {n}" for n in names[:k]],
        ncols=k,
    )
    result["per_shape_CD"] = {n: float(c) for n, c in zip(names, cd)}
    write_json(out / "metrics.json", result)
    title = f"PointFlow reconstruction ({result['n']} shapes of {result['split'] or result.get('input')})"
    print_metrics(title, result, fmt=".6g")  # per-shape lists: JSON only
    return result


def _emd_fn(method: str):
    """The EMD of one pair, reference cloud first: approxmatch, exact or sinkhorn."""
    if method not in M.EMD_METHODS:
        raise ValueError(f"emd={method!r}: choose one of {', '.join(M.EMD_METHODS)} or none")
    return {"approxmatch": M.emd_approxmatch, "exact": M.emd_exact, "sinkhorn": M.emd_sinkhorn}[method]


def _reference(cfg: DictConfig, restored: Restored | None, points: int | None):
    """Reference clouds (R, P, 3) in data units, and what they are (for the JSON), plus the normalised clouds and
    per-shape mean/std when they come from a data split (to de-normalise generated shapes as test.py does)."""
    ref = cfg.get("reference")
    if ref and is_cloud_set(ref):
        clouds, _ = read_cloud_set(ref, points, cfg.seed)
        x = torch.as_tensor(clouds)
        return x, {"reference": str(ref), "split": None}, None
    if restored is not None:
        dm = restored.datamodule
    elif ref:  # a PC15k root without a checkpoint: its own train split's statistics normalise it
        dm = PointCloudDataModule(**{"root": str(ref), "source": "pc15k", **OmegaConf.to_container(cfg.data)})
    else:
        raise ValueError("evaluate: give ckpt=... or reference=<folder of clouds | .npy/.npz (S, N, 3) | PC15k root>")
    ds = _split_set(dm, cfg.split)
    x, mean, std = ds.reference_clouds("test", points or dm.eval_points)
    if cfg.max_shapes:
        x, mean, std = x[: cfg.max_shapes], mean[: cfg.max_shapes], std[: cfg.max_shapes]
    what = {"reference": str(dm.data_root), "split": cfg.split, "categories": list(ds.categories)}
    return x * std + mean, what, (x, mean, std)


def evaluate(cfg: DictConfig) -> dict:
    """Generation metrics as PointFlow's table (MMD/COV/1-NNA in CD and EMD, JSD) of a checkpoint's samples or of
    ``samples=`` (a folder of clouds, or a .npy/.npz array (S, N, 3)) against ``reference=`` (the same kinds, or
    a PC15k root) or the checkpoint's ``split`` (``val`` by default, as the reference); for a checkpoint also
    the negative ELBO of the reference shapes. metrics.json names the protocol: split, set sizes, points, EMD."""
    if not cfg.ckpt and not cfg.samples:
        raise ValueError("evaluate: give ckpt=<checkpoint> or samples=<folder | .npy/.npz of clouds (S, N, 3)>")
    restored = None
    if cfg.ckpt:
        ref = cfg.get("reference")
        root = {"root": str(ref), "source": "pc15k"} if ref and not is_cloud_set(ref) else None
        restored = _restore(cfg, root)
    points = _points(cfg, restored)
    ref_d, result, split_clouds = _reference(cfg, restored, points)
    points = ref_d.shape[1]
    if cfg.samples:
        clouds, _ = read_cloud_set(cfg.samples, points, cfg.seed)
        gen = torch.as_tensor(clouds)
        result["samples"] = str(cfg.samples)
    else:
        module = restored.module
        if split_clouds is None:  # a folder of reference clouds: de-normalise with the training data's statistics
            ref_n = (ref_d - module.data_mean.cpu()) / module.data_std.cpu()
            mean, std = module.data_mean.cpu().expand(len(ref_d), 1, 3), module.data_std.cpu().expand(len(ref_d), 1, 3)
        else:
            ref_n, mean, std = split_clouds
        gen = _generate(module, len(ref_d), points, mean, std, cfg)
        result["samples"] = f"{restored.path} (seed {cfg.seed})"
        result.update(_neg_elbo(module, ref_n, cfg))
    result.update(n_reference=len(ref_d), n_samples=len(gen), points=points, emd_method=_emd_method(cfg.emd))
    if len(gen) != len(ref_d):
        msg = (
            f"evaluate: {len(gen)} samples against {len(ref_d)} reference shapes; 1-NNA assumes equal sets "
            "(with unequal sizes its chance level is no longer 50 %) and COV/MMD change with the sample count"
        )
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        result["warning"] = "sets differ in size: 1-NNA is biased"
    device = resolve_device(cfg.get("device"))
    emd = result["emd_method"]
    metrics = M.compute_all_metrics(
        gen.to(device), ref_d.to(device), batch_size=cfg.metric_batch_size, emd=emd, progress=True
    )
    result.update({k: float(v) for k, v in metrics.items()})
    out = Path(cfg.output_dir)
    write_json(out / "metrics.json", result)
    render_clouds(list(gen[:8].numpy()), out / "samples.png")
    print(paper_table(result))
    return result


def _generate(module, n: int, points: int, mean: torch.Tensor, std: torch.Tensor, cfg: DictConfig) -> torch.Tensor:
    """``n`` shapes from the model, batch by batch; shape ``i`` de-normalised with reference ``i``'s statistics
    (the reference's test.py)."""
    torch.manual_seed(cfg.seed)
    model = module.eval_model
    if cfg.exact_trace:
        model.set_trace("exact")
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, n, cfg.batch_size), desc="sampling", unit="batch"):
            b = min(cfg.batch_size, n - i)
            _, x = model.sample(b, points)
            chunks.append(x.cpu() * std[i : i + b] + mean[i : i + b])
    return torch.cat(chunks)


def _emd_method(choice: str) -> str:
    """``auto`` is the paper's EMD (approxmatch) on every device; ``none`` skips the EMD columns."""
    if choice == "auto":
        return "approxmatch"
    if choice not in (*M.EMD_METHODS, "none"):
        raise ValueError(f"emd={choice!r}: choose auto, {', '.join(M.EMD_METHODS)} or none")
    return choice


def _neg_elbo(module, ref: torch.Tensor, cfg: DictConfig) -> dict:
    """Negative ELBO of the reference shapes (normalised units), in nats per shape and bits per point."""
    model, total, n = module.eval_model, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ref), cfg.batch_size):
            x = ref[i : i + cfg.batch_size].to(module.device)
            t = model.elbo_terms(x)
            total += float((t["recon"] + t["prior"] - t["entropy"]).sum())
            n += len(x)
    nelbo = total / n
    return {"neg_elbo_nats": nelbo, "bits_per_point": nats_to_bits_per_dim(nelbo, ref.shape[1])}


# PointFlow's Table 1: column, key, scale, unit
PAPER_COLUMNS = (
    ("JSD", "JSD", 1e2, "x1e2"),
    ("MMD-CD", "MMD-CD", 1e3, "x1e3"),
    ("MMD-EMD", "MMD-EMD", 1e2, "x1e2"),
    ("COV-CD", "COV-CD", 1e2, "%"),
    ("COV-EMD", "COV-EMD", 1e2, "%"),
    ("1-NNA-CD", "1-NNA-CD", 1e2, "%"),
    ("1-NNA-EMD", "1-NNA-EMD", 1e2, "%"),
)


def paper_table(result: dict) -> str:
    """The metrics as a row of PointFlow's Table 1 (JSD x1e2, MMD-CD x1e3, MMD-EMD x1e2, COV %, 1-NNA %), under a
    line naming the protocol (reference set, split, sizes, points, EMD)."""
    split = f"split {result['split']}" if result.get("split") else "given reference clouds"
    head = (
        f"PointFlow protocol: {split} of {result.get('reference')}, {result['n_reference']} reference shapes, "
        f"{result['n_samples']} samples, {result['points']} points, EMD {result['emd_method']}"
    )
    cols = [(c, k, s, u) for c, k, s, u in PAPER_COLUMNS if k in result]
    names = [f"{c} ({u})" for c, _, _, u in cols]
    values = [f"{result[k] * s:.2f}" for _, k, s, _ in cols]
    widths = [max(len(a), len(b)) for a, b in zip(names, values)]
    row = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [head, row(names), "|" + "|".join("-" * (w + 2) for w in widths) + "|", row(values)]
    if "bits_per_point" in result:
        lines.append(f"negative ELBO of the reference shapes: {result['bits_per_point']:.4f} bits per point")
    if "warning" in result:
        lines.append(f"WARNING: {result['warning']}")
    return "\n".join(lines)


COMMANDS = {"train": train, "sample": sample, "reconstruct": reconstruct, "evaluate": evaluate}
DESCRIPTIONS = {
    "train": "fit PointFlow (data.categories=chair data.root=<PC15k root | mesh folder | voxel .npz>)",
    "sample": "ckpt=<file or run dir> n=16 [points=N]: .ply files, samples.npy and a PNG grid",
    "reconstruct": "ckpt=... [input=val | test | <cloud file | folder>]: auto-encoded clouds, CD/EMD over the split",
    "evaluate": "ckpt=... [split=val] or samples=<dir | .npy | .npz> reference=<dir | .npy | .npz | PC15k root>: "
    "MMD/COV/1-NNA (CD, approxmatch EMD), JSD in the paper's table",
}
