"""PointFlow commands: train, sample, reconstruct, evaluate. Each takes the composed Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from apps.pointflow import metrics as M
from apps.pointflow.io import CLOUD_SUFFIXES, read_cloud, read_cloud_folder, write_ply
from apps.pointflow.plots import render_clouds
from core.metrics import nats_to_bits_per_dim
from core.training import fit, restore
from core.training.reporting import print_metrics, resolve_device
from core.training.runner import write_json

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit PointFlow; writes checkpoints, metrics.json and final renders (samples.png, samples/*.ply)."""
    result = fit(cfg)
    if result.trainer.is_global_zero and cfg.get("render_after_fit", True):
        module = result.module.cpu().eval()
        model = module.eval_model
        with torch.no_grad():
            if model.latent is not None:
                _, x = model.sample(8, module.sample_points)
                x = module.denormalize(x).numpy()
                for i, pts in enumerate(x):
                    write_ply(result.output_dir / "samples" / f"sample_{i:04d}.ply", pts)
                log.info("renders: %s", render_clouds(list(x), result.output_dir / "samples.png"))
    return result.metrics


def _load(cfg: DictConfig):
    restored = restore(cfg.ckpt, app=cfg.app, map_location=resolve_device(cfg.get("device")))
    return restored.module, restored.cfg


def sample(cfg: DictConfig) -> Path:
    """``n`` new shapes from a checkpoint: samples/*.ply, samples.npy (n, points, 3) in data units, samples.png."""
    module, _ = _load(cfg)
    torch.manual_seed(cfg.seed)
    model, out = module.eval_model, Path(cfg.output_dir)
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, cfg.n, cfg.batch_size), desc="sampling", unit="batch"):
            b = min(cfg.batch_size, cfg.n - start)
            _, x = model.sample(b, cfg.points, cfg.temperature, cfg.latent_temperature)
            chunks.append(module.denormalize(x).cpu().numpy())
    x = np.concatenate(chunks)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", x)
    for i, pts in enumerate(x):
        write_ply(out / "samples" / f"sample_{i:04d}.ply", pts)
    render_clouds(list(x[:16]), out / "samples.png", [f"sample {i}" for i in range(min(16, len(x)))])
    log.info("wrote %d shapes to %s (samples.npy, samples/*.ply, samples.png)", len(x), out)
    return out / "samples.npy"


def _datamodule(cfg: DictConfig, ckpt_cfg: DictConfig):
    """The checkpoint's data config, with any ``data.*`` given on the command line merged over it."""
    data_cfg = OmegaConf.merge(ckpt_cfg.data, cfg.get("data") or {})
    dm = instantiate(data_cfg)
    dm.prepare_data()
    dm.setup("test")
    return dm


def reconstruct(cfg: DictConfig) -> dict:
    """Auto-encode clouds (``input`` = a file, a folder of clouds, or ``val``/``test`` of the training data).

    Writes recon_*.ply, a PNG of inputs above reconstructions, and Chamfer/EMD per shape (reconstruction metrics as
    PointFlow: CD and EMD between the reconstruction and the shape's held-out test points, in data units)."""
    module, ckpt_cfg = _load(cfg)
    device, model, out = module.device, module.eval_model, Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    if cfg.input in ("val", "test"):
        dm = _datamodule(cfg, ckpt_cfg)
        ds = dm.val_set if cfg.input == "val" else dm.test_set
        n = min(len(ds), cfg.max_shapes or len(ds))
        items = [ds[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(it["x"]) for it in items])
        ref = torch.stack([torch.as_tensor(it["test_points"]) for it in items])
        mean = torch.stack([torch.as_tensor(it["mean"]) for it in items])
        std = torch.stack([torch.as_tensor(it["std"]) for it in items])
        names = [f"{cfg.input}_{i:04d}" for i in range(n)]
    else:
        path = Path(cfg.input)
        if path.is_dir():
            clouds, paths = read_cloud_folder(path, cfg.points, cfg.seed)
        elif path.suffix in CLOUD_SUFFIXES:
            pts = read_cloud(path)
            idx = np.random.default_rng(cfg.seed).choice(len(pts), min(cfg.points, len(pts)), replace=False)
            clouds, paths = pts[idx][None], [path]
        else:
            raise ValueError(f"input={cfg.input}: expected a point-cloud file, a folder of them, 'val' or 'test'")
        raw = torch.as_tensor(clouds)
        mean, std = module.data_mean.cpu().expand(len(raw), 1, 3), module.data_std.cpu().expand(len(raw), 1, 3)
        x = (raw - mean) / std  # into the model's normalised units
        ref, names = x, [p.stem for p in paths]
    recons = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x), cfg.batch_size), desc="reconstructing", unit="batch"):
            recons.append(model.reconstruct(x[i : i + cfg.batch_size].to(device), cfg.points).cpu())
    recon = torch.cat(recons) * std + mean
    ref_d, x_d = ref * std + mean, x * std + mean
    cd = M.chamfer_distance(recon, ref_d)
    result = {"n": len(x), "CD": float(cd.mean())}
    if recon.shape[1] == ref_d.shape[1] and cfg.emd != "none":
        emd = M.emd_exact(recon, ref_d) if cfg.emd == "exact" else M.emd_sinkhorn(recon, ref_d)
        result["EMD"] = float(emd.mean())
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
    print_metrics(f"PointFlow reconstruction ({result['n']} shapes)", result, fmt=".6g")  # per-shape lists: JSON only
    return result


def _reference(
    cfg: DictConfig, ckpt_cfg: DictConfig | None, points: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference clouds (S, points, 3) and per-shape mean/std to de-normalise with (PointFlow's test.py protocol)."""
    if cfg.reference:
        ref = Path(cfg.reference)
        if ref.is_dir() and any(p.suffix in CLOUD_SUFFIXES for p in ref.iterdir()):
            clouds, _ = read_cloud_folder(ref, points, cfg.seed)
            x = torch.as_tensor(clouds)
            return x, torch.zeros(len(x), 1, 3), torch.ones(len(x), 1, 1)
        if ckpt_cfg is None:
            data_cfg = OmegaConf.create({"_target_": "apps.pointflow.data.PointCloudDataModule", "root": str(ref)})
            data_cfg = OmegaConf.merge(data_cfg, cfg.get("data") or {})
            ckpt_cfg = OmegaConf.create({"data": data_cfg})
        else:
            ckpt_cfg = OmegaConf.merge(ckpt_cfg, {"data": {"root": str(ref)}})
    if ckpt_cfg is None:
        raise ValueError("evaluate: give ckpt=... or reference=<folder of clouds or PC15k root>")
    dm = _datamodule(cfg, ckpt_cfg)
    ds = {"test": dm.test_set, "val": dm.val_set, "train": dm.train_set}[cfg.split]
    x, mean, std = ds.reference_clouds("test", points)
    if cfg.max_shapes:
        x, mean, std = x[: cfg.max_shapes], mean[: cfg.max_shapes], std[: cfg.max_shapes]
    return x, mean, std


def evaluate(cfg: DictConfig) -> dict:
    """Generation metrics (MMD/COV/1-NNA in CD and EMD, JSD) of a checkpoint's samples or of ``samples=<dir>``
    against a reference split or folder; plus, for a checkpoint, the test ELBO in bits per point."""
    if not cfg.ckpt and not cfg.samples:
        raise ValueError("evaluate: give ckpt=<checkpoint> or samples=<folder of .ply/.npy clouds>")
    module, ckpt_cfg = _load(cfg) if cfg.ckpt else (None, None)
    ref, mean, std = _reference(cfg, ckpt_cfg, cfg.points)
    ref_d = ref * std + mean
    result: dict = {"n_reference": len(ref)}
    if cfg.samples:
        clouds, _ = read_cloud_folder(cfg.samples, cfg.points, cfg.seed)
        gen = torch.as_tensor(clouds)
        result["source"] = str(cfg.samples)
    else:
        torch.manual_seed(cfg.seed)
        model = module.eval_model
        if cfg.exact_trace:
            model.set_trace("exact")
        chunks = []
        with torch.no_grad():
            for i in tqdm(range(0, len(ref), cfg.batch_size), desc="sampling", unit="batch"):
                b = min(cfg.batch_size, len(ref) - i)
                _, x = model.sample(b, cfg.points)
                # PointFlow's test.py: each generated batch is de-normalised with the reference batch's stats
                chunks.append(x.cpu() * std[i : i + b] + mean[i : i + b])
            gen = torch.cat(chunks)
            result.update(_test_elbo(module, ref, cfg))
        result["source"] = str(cfg.ckpt)
    device = resolve_device(cfg.get("device"))
    emd = _emd_method(cfg.emd, len(gen) + len(ref), device)
    metrics = M.compute_all_metrics(
        gen.to(device), ref_d.to(device), batch_size=cfg.metric_batch_size, emd=emd, progress=True
    )
    result.update({k: float(v) for k, v in metrics.items()}, emd_method=emd, n_samples=len(gen))
    out = Path(cfg.output_dir)
    write_json(out / "metrics.json", result)
    render_clouds(list(gen[:8].numpy()), out / "samples.png")
    print_metrics("PointFlow generation metrics", result, fmt=".6g", show=_paper_units)
    return result


def _emd_method(choice: str, clouds: int, device: torch.device) -> str:
    """``auto``: Sinkhorn on a GPU; on a CPU the exact assignment (faster there than Sinkhorn) while the
    ~clouds^2 / 2 pairs stay few, else no EMD (say so: exact EMD on hundreds of shapes takes hours on a CPU)."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "sinkhorn"
    if clouds**2 / 2 <= 200:  # ~0.5-2 s per 2048-point pair on 2 cores
        return "exact"
    log.warning("emd=auto: skipping EMD metrics, %d clouds are too many for a CPU (pass emd=exact to insist)", clouds)
    return "none"


def _test_elbo(module, ref: torch.Tensor, cfg: DictConfig) -> dict:
    """Negative ELBO of the reference shapes (normalised units), in nats per shape and bits per point."""
    model, total, n = module.eval_model, 0.0, 0
    for i in range(0, len(ref), cfg.batch_size):
        x = ref[i : i + cfg.batch_size].to(module.device)
        t = model.elbo_terms(x)
        total += float((t["recon"] + t["prior"] - t["entropy"]).sum())
        n += len(x)
    nelbo = total / n
    return {"test_neg_elbo_nats": nelbo, "test_bits_per_point": nats_to_bits_per_dim(nelbo, ref.shape[1])}


def _paper_units(key: str, value) -> str | None:
    """MMD in the paper's scaled units, COV and 1-NNA in per cent, beside the raw value."""
    if not isinstance(value, float):
        return None
    scale = {"MMD-CD": ("x1e3", 1e3), "MMD-EMD": ("x1e2", 1e2)}
    if key in scale:
        unit, f = scale[key]
        return f"{value:.6g}  ({value * f:.3f} {unit})"
    if key.startswith(("COV", "1-NNA")):
        return f"{value:.6g}  ({100 * value:.2f} %)"
    return None


COMMANDS = {"train": train, "sample": sample, "reconstruct": reconstruct, "evaluate": evaluate}
DESCRIPTIONS = {
    "train": "fit PointFlow (data.categories=chair data.root=<PC15k root | mesh folder | voxel .npz>)",
    "sample": "ckpt=<file or run dir> n=16 points=2048: .ply files, samples.npy and a PNG grid",
    "reconstruct": "ckpt=... input=<cloud file | folder | val | test>: auto-encoded clouds, CD/EMD per shape",
    "evaluate": "ckpt=... [split=test] or samples=<dir> reference=<dir | PC15k root>: MMD/COV/1-NNA (CD, EMD), JSD",
}
