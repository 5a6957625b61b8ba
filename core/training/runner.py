"""Build everything from a Hydra config and fit it: the only training loop in flowsuite is Lightning's.

The config contract (every app's ``train.yaml``): ``model`` (the density model), ``module`` (a FlowModule
subclass with its optimizer partials), ``data`` (a LightningDataModule), ``trainer``, ``logger``, ``callbacks``,
``output_dir``, ``seed`` and ``ckpt_path`` (resume).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from core.training.module import FlowModule

__all__ = ["FitResult", "build_module", "build_trainer", "fit", "load_checkpoint", "resolve_checkpoint", "write_json"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    metrics: dict[str, float]
    trainer: pl.Trainer
    module: FlowModule
    datamodule: pl.LightningDataModule
    output_dir: Path


def build_module(cfg: DictConfig) -> FlowModule:
    """Instantiate ``cfg.model`` and wrap it in ``cfg.module``; the resolved config rides along in checkpoints."""
    model = instantiate(cfg.model)
    module = instantiate(cfg.module, model=model)
    if not isinstance(module, FlowModule):
        raise TypeError(f"config key 'module' must build a core.training.FlowModule, got {type(module).__name__}")
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def _logger(cfg: DictConfig) -> Any:
    lg = cfg.get("logger")
    if not lg:
        return None
    return instantiate(lg)


def _callbacks(cfg: DictConfig, has_logger: bool) -> list[pl.Callback]:
    out = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if not cb_cfg:
            continue
        if name == "lr_monitor" and not has_logger:
            continue  # Lightning refuses a LearningRateMonitor without a logger
        cb = instantiate(cb_cfg)
        if isinstance(cb, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue  # trainer.enable_progress_bar=false wins over the callbacks group
        out.append(cb)
    return out


def build_trainer(cfg: DictConfig, **overrides: Any) -> pl.Trainer:
    """``cfg.trainer`` with the configured logger and callbacks; ``overrides`` win over the config."""
    logger = overrides.pop("logger", _logger(cfg))
    callbacks = overrides.pop("callbacks", _callbacks(cfg, logger is not None))
    return instantiate(cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks, **overrides)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoints/last.ckpt``; errors name what was missing."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"ckpt: no checkpoints/last.ckpt in run directory {p}")
    if not p.is_file():
        raise FileNotFoundError(f"ckpt: checkpoint file {p} does not exist")
    return p


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fit(cfg: DictConfig) -> FitResult:
    """Seed, build data, module and trainer, train (resuming from ``cfg.ckpt_path``), test, write metrics.json."""
    pl.seed_everything(cfg.get("seed", 0), workers=True)
    _share_cpu_threads(cfg)
    output_dir = Path(cfg.output_dir)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    ckpt = cfg.get("ckpt_path")
    ckpt = str(resolve_checkpoint(ckpt)) if ckpt else None
    if ckpt:
        log.info("resuming from %s", ckpt)
    try:
        with warnings.catch_warnings():
            # with OnExceptionCheckpoint, Lightning reads ckpt_path=None as "last" and warns when there is none
            warnings.filterwarnings("ignore", message=".*ckpt_path=None.*was called without a model")
            warnings.filterwarnings("ignore", message=".*there is no last checkpoint available")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        if cfg.get("test_after_fit", True) and _has_test_data(datamodule):
            trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        _finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return FitResult(metrics, trainer, module, datamodule, output_dir)


def _share_cpu_threads(cfg: DictConfig) -> None:
    """Several CPU ranks on one machine: give each its share of the cores. Oversubscribed OpenMP threads spin
    against each other and can make small ops tens of times slower."""
    t = cfg.trainer
    devices = t.get("devices", 1)
    if t.get("accelerator") == "cpu" and isinstance(devices, int) and devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))


def _has_test_data(datamodule: pl.LightningDataModule) -> bool:
    return type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader


def _finish_wandb() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[FlowModule, DictConfig]:
    """Rebuild the module a flowsuite checkpoint was trained with, load its weights, and return it in eval mode."""
    path = resolve_checkpoint(path)
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "flowsuite_config" not in ckpt:
        raise ValueError(f"{path} is not a flowsuite checkpoint (no 'flowsuite_config' entry)")
    cfg = OmegaConf.create(ckpt["flowsuite_config"])
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.to(map_location).eval()
    return module, cfg
