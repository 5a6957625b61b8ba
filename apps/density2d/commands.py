"""density2d commands: train, sample, evaluate. Each takes the composed Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from apps.density2d.data import DATASETS, true_log_prob
from apps.density2d.plots import plot_density
from core.metrics import mean_and_stderr, nats_to_bits_per_dim
from core.training import fit, restore
from core.training.reporting import print_metrics
from core.training.runner import write_json

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit the configured flow; writes checkpoints, metrics.json and density.png into the run directory."""
    result = fit(cfg)
    if result.trainer.is_global_zero:
        data = result.datamodule.splits["test"].numpy()
        path = plot_density(
            result.module.eval_model.cpu(),
            data,
            result.output_dir / "density.png",
            title=f"{cfg.data.dataset} / {cfg.model._target_.rsplit('.', 1)[-1]}",
        )
        log.info("density plot: %s", path)
    return result.metrics


def sample(cfg: DictConfig) -> Path:
    """Draw ``n`` samples from a checkpoint: samples.npy and samples.png."""
    module = restore(cfg.ckpt, app=cfg.app).module
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        x = module.eval_model.sample(cfg.n, temperature=cfg.temperature).numpy()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", x)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.hist2d(x[:, 0], x[:, 1], bins=150, cmap="viridis")
    ax.set_title(f"{cfg.n} samples, temperature {cfg.temperature}")
    fig.savefig(out / "samples.png", dpi=90)
    plt.close(fig)
    log.info("wrote %s and %s", out / "samples.npy", out / "samples.png")
    return out / "samples.npy"


def evaluate(cfg: DictConfig) -> dict:
    """Test NLL (nats and bits/dim, with standard error) of a checkpoint, and the gap to the true entropy."""
    module, _, dm = restore(cfg.ckpt, {"data": cfg.get("data")}, app=cfg.app)
    dm.setup()
    x = dm.splits[cfg.split]
    with torch.no_grad():
        logp = torch.cat([module.eval_model.log_prob(b) for b in x.split(cfg.batch_size)])
    nll, se = mean_and_stderr(-logp)
    metrics = {"split": cfg.split, "n": len(x), "nll": nll, "nll_stderr": se, "bpd": nats_to_bits_per_dim(nll, 2)}
    if dm.dataset in ("moons", "circles", "8gaussians"):
        entropy, ent_se = mean_and_stderr(torch.from_numpy(-true_log_prob(dm.dataset, x.numpy())))
        metrics.update(true_entropy=entropy, true_entropy_stderr=ent_se, gap_nats=nll - entropy)
    out = Path(cfg.output_dir)
    write_json(out / "metrics.json", metrics)
    plot_density(module.eval_model, x.numpy(), out / "density.png", title=f"{dm.dataset}: test NLL {nll:.3f} nats")
    print_metrics(f"density2d evaluate ({dm.dataset}, {cfg.split})", metrics, fmt=".4f")
    return metrics


COMMANDS = {"train": train, "sample": sample, "evaluate": evaluate}
DESCRIPTIONS = {
    "train": f"fit a flow (model=realnvp|maf|iaf|nice|glow_like|cnf) to data.dataset={'|'.join(DATASETS)}|<file>",
    "sample": "ckpt=<file or run dir> n=10000 temperature=1.0: samples.npy + samples.png",
    "evaluate": "ckpt=<file or run dir> split=test: NLL, bits/dim, gap to the true entropy, density.png",
}
