"""VideoFlow commands: train, predict, evaluate. Each takes the composed Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from apps.videoflow.data import load_input_clips
from apps.videoflow.media import write_gif, write_mp4, write_strip
from apps.videoflow.metrics import best_of_n
from apps.videoflow.model import from_nbit, to_nbit
from core.metrics import mean_and_stderr, nats_to_bits_per_dim
from core.training import fit, restore
from core.training.reporting import print_metrics, resolve_device
from core.training.runner import write_json

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit VideoFlow: checkpoints, metrics.json (val/test bits per pixel), predicted videos in media/."""
    return fit(cfg).metrics


def _restore(cfg: DictConfig):
    """The checkpoint's module and run config (``data.*`` from the command line merged over it), and its datamodule."""
    return restore(cfg.ckpt, {"data": cfg.get("data")}, app=cfg.app, map_location=resolve_device(cfg.get("device")))


def _write_videos(out: Path, name: str, context: np.ndarray, futures: np.ndarray, truth: np.ndarray | None, fps: float):
    """``context`` (K, C, H, W), ``futures`` (S, T, C, H, W): one GIF and MP4 per sample, one PNG strip."""
    scale = max(1, 128 // context.shape[-1])
    mp4 = True
    for s, fut in enumerate(futures):
        video = np.concatenate([context, fut])
        write_gif(out / f"{name}_sample{s}.gif", video, fps, scale)
        if mp4:
            try:
                write_mp4(out / f"{name}_sample{s}.mp4", video, fps, scale)
            except RuntimeError as err:  # no ffmpeg plugin: the GIFs and the strip carry the same frames
                log.warning("%s; writing GIFs and the PNG strip only", err)
                mp4 = False
    rows = ([truth] if truth is not None else []) + [np.concatenate([context, f]) for f in futures]
    write_strip(out / f"{name}.png", rows, scale=scale)


def predict(cfg: DictConfig) -> Path:
    """Sample ``num_samples`` futures of ``steps`` frames for every input clip (``input=`` a video, an array file or
    a folder; without it the first ``num_videos`` test clips of the checkpoint's data): GIF, MP4 and PNG strip."""
    restored = _restore(cfg)
    module, ckpt_cfg = restored.module, restored.cfg
    model = module.eval_model.eval()
    k = model.context_frames
    steps = cfg.steps or ckpt_cfg.data.target_frames
    torch.manual_seed(cfg.seed)
    truth = None
    if cfg.input:
        layout, key = cfg.get("layout", "auto"), cfg.get("key")
        clips, names = load_input_clips(cfg.input, k, model.size, model.channels, layout, key)
        clips = clips[: cfg.num_videos] if cfg.num_videos else clips
        names = names[: len(clips)]
    else:
        dm = restored.datamodule
        dm.setup("test")
        ds = dm.test_set
        n = min(len(ds), cfg.num_videos or len(ds))
        truth = torch.stack([ds[i] for i in range(n)]).numpy()
        clips, names = truth[:, :k], [f"test_{i:04d}" for i in range(n)]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = torch.as_tensor(clips).to(module.device)
    all_futures = []
    for i in tqdm(range(len(ctx)), desc="predicting", unit="video"):
        rep = ctx[i : i + 1].expand(cfg.num_samples, -1, -1, -1, -1)
        fut = model.predict(rep, steps, cfg.temperature).cpu().numpy()
        all_futures.append(fut)
        _write_videos(out, names[i], clips[i], fut, None if truth is None else truth[i], cfg.fps)
    np.save(out / "predictions.npy", np.stack(all_futures))  # (N, S, steps, C, H, W) uint8
    log.info("wrote %d x %d sampled futures to %s (GIF, MP4, PNG, predictions.npy)", len(ctx), cfg.num_samples, out)
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Test-set bits per pixel of the target frames (uniform-dequantisation bound, averaged over ``bpd_draws``
    noise draws) and best-of-``num_samples`` PSNR / SSIM of sampled futures at ``temperature`` (``num_samples``
    null: the training run's ``evaluation.num_samples``)."""
    module, run_cfg, dm = _restore(cfg)
    model = module.eval_model.eval()
    num_samples = 0
    if cfg.psnr_ssim:
        # runs from before evaluation.num_samples existed: 10, what train.yaml sets
        num_samples = cfg.num_samples or OmegaConf.select(run_cfg, "evaluation.num_samples", default=None) or 10
    dm.setup("test")
    ds = dm.test_set
    n = min(len(ds), cfg.max_videos or len(ds))
    k = model.context_frames
    torch.manual_seed(cfg.seed)
    nll, dims, scores = [], None, {"psnr": [], "ssim": [], "psnr_t": [], "ssim_t": []}
    with torch.no_grad():
        for a in tqdm(range(0, n, cfg.batch_size), desc="evaluating", unit="batch"):
            x = torch.stack([ds[i] for i in range(a, min(n, a + cfg.batch_size))]).to(module.device)
            lp = torch.stack([model.log_prob(x) for _ in range(cfg.bpd_draws)]).mean(0)
            nll.append(-lp.cpu())
            dims = (x.shape[1] - k) * x[0, 0].numel()
            if num_samples:
                rep = x[:, :k].repeat(num_samples, 1, 1, 1, 1)
                fut = model.predict(rep, x.shape[1] - k, cfg.temperature).reshape(num_samples, len(x), -1, *x.shape[2:])
                # against the truth at the model's bit depth: an n-bit model cannot render the dropped low bits
                s = best_of_n(fut, from_nbit(to_nbit(x[:, k:], model.bits), model.bits))
                for key in scores:
                    scores[key].append(s[key].cpu() if key in ("psnr", "ssim") else s[key].cpu()[None] * len(x))
    nll_t = torch.cat(nll)
    nll_mean, nll_stderr = mean_and_stderr(nll_t)
    result = {
        "split": "test",
        "first_clip_only": bool(getattr(dm, "first_clip_only", False)),  # one clip per video from frame 0 (BAIR)
        "bpd_draws": cfg.bpd_draws,
        "n_videos": n,
        "context_frames": k,
        "target_frames": int(dims // ds[0][0].numel()),
        "bits": model.bits,
        "test_nll_nats": nll_mean,
        "test_bpd": nats_to_bits_per_dim(nll_mean, dims),
        "test_bpd_stderr": nats_to_bits_per_dim(nll_stderr, dims),  # NaN for a single clip
    }
    if num_samples:
        result.update(
            num_samples=num_samples,
            temperature=cfg.temperature,
            best_psnr=float(torch.cat(scores["psnr"]).mean()),
            best_ssim=float(torch.cat(scores["ssim"]).mean()),
            best_psnr_per_step=(torch.cat(scores["psnr_t"]).sum(0) / n).tolist(),
            best_ssim_per_step=(torch.cat(scores["ssim_t"]).sum(0) / n).tolist(),
        )
    write_json(Path(cfg.output_dir) / "metrics.json", result)
    print_metrics(f"VideoFlow evaluation ({n} test videos, {result['bits']}-bit)", result, fmt=".4f")
    return result


COMMANDS = {"train": train, "predict": predict, "evaluate": evaluate}
DESCRIPTIONS = {
    "train": "fit VideoFlow (data=stochastic_movement | moving_mnist | arrays | videos; experiment=paper)",
    "predict": "ckpt=<file or run dir> [input=<video | .npy/.npz | folder>] num_samples=4: GIF, MP4, PNG strip",
    "evaluate": "ckpt=...: test bits per pixel (target frames) and best-of-N PSNR / SSIM of sampled futures",
}
