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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from core.training.checkpoint import (
    CheckpointError,
    SafeCheckpointIO,
    checkpoint_step,
    read_checkpoint,
    resolve_checkpoint,
)
from core.training.module import FlowModule

__all__ = [
    "CommandLog",
    "FitResult",
    "Restored",
    "command_loggers",
    "build_module",
    "build_trainer",
    "fit",
    "restore",
    "finish_wandb",
    "write_json",
]

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
    """``cfg.trainer`` with the configured logger and callbacks; ``overrides`` win over the config.

    Checkpoints go through :class:`~core.training.checkpoint.SafeCheckpointIO` (finite tensors only, never an older
    step over a newer one, atomic writes, ``weights_only`` loading)."""
    logger = overrides.pop("logger", _logger(cfg))
    callbacks = overrides.pop("callbacks", _callbacks(cfg, logger is not None))
    plugins = overrides.pop("plugins", [SafeCheckpointIO()])
    return instantiate(
        cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks, plugins=plugins, **overrides
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fit(
    cfg: DictConfig, datamodule: pl.LightningDataModule | None = None, module: FlowModule | None = None
) -> FitResult:
    """Seed, build data, module and trainer, train (resuming from ``cfg.ckpt_path``), test, write metrics.json.

    ``datamodule`` / ``module`` replace what ``cfg.data`` / ``cfg.model`` would build (e.g. a fine-tuning run that
    starts from restored weights)."""
    pl.seed_everything(cfg.get("seed", 0), workers=True)
    _share_cpu_threads(cfg)
    output_dir = Path(cfg.output_dir)
    datamodule = datamodule if datamodule is not None else instantiate(cfg.data)
    module = module if module is not None else build_module(cfg)
    if module.run_config is None:
        module.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = build_trainer(cfg)
    ckpt = cfg.get("ckpt_path")
    ckpt = str(resolve_checkpoint(ckpt)) if ckpt else None
    if ckpt:
        read_checkpoint(ckpt, app=cfg.get("app"))  # a clear error for a foreign or broken file, before Lightning's
        log.info("resuming from %s (step %d)", ckpt, checkpoint_step(ckpt))
    try:
        with warnings.catch_warnings():
            # with OnExceptionCheckpoint, Lightning reads ckpt_path=None as "last" and warns when there is none
            warnings.filterwarnings("ignore", message=".*ckpt_path=None.*was called without a model")
            warnings.filterwarnings("ignore", message=".*there is no last checkpoint available")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        if cfg.get("test_after_fit", True) and _has_test_data(datamodule):
            trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        finish_wandb()
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


def finish_wandb() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


@dataclass
class CommandLog:
    """The logging target of a command that does not train (sample, evaluate ...): what the media helpers of
    :mod:`core.training.media` take in place of a Trainer."""

    loggers: list[Any]
    global_step: int = 0


@contextmanager
def command_loggers(cfg: DictConfig, global_step: int = 0) -> Iterator[CommandLog | None]:
    """The configured logger (``cfg.logger``) for a command outside training; None when ``logger=none``. The W&B run
    is closed on exit, so each command is one run."""
    logger = _logger(cfg)
    try:
        yield CommandLog([logger], global_step) if logger is not None else None
    finally:
        finish_wandb()


class Restored:
    """What :func:`restore` gives back: the trained ``module`` (eval mode), its run ``cfg`` (with the overrides merged),
    its ``datamodule`` (built on first use from ``cfg.data``; not yet set up), the checkpoint ``path`` and its
    ``global_step``. Unpacks as ``module, cfg, datamodule``."""

    def __init__(self, module: FlowModule, cfg: DictConfig, path: Path, global_step: int) -> None:
        self.module, self.cfg, self.path, self.global_step = module, cfg, path, global_step
        self._datamodule: pl.LightningDataModule | None = None

    @property
    def datamodule(self) -> pl.LightningDataModule:
        if self._datamodule is None:
            self._datamodule = instantiate(self.cfg.data)
        return self._datamodule

    def __iter__(self):
        return iter((self.module, self.cfg, self.datamodule))


def restore(
    ckpt: str | Path,
    overrides: Mapping[str, Any] | DictConfig | None = None,
    app: str | None = None,
    map_location: str | torch.device = "cpu",
) -> Restored:
    """The second half of every run: rebuild the module a checkpoint was trained with and load its weights.

    Arguments:
        ckpt: a checkpoint file, or a run directory (its newest checkpoint by global step).
        overrides: config values merged over the checkpoint's run config (e.g. ``{"data": {"root": ...}}``); None
            values and empty groups are ignored.
        app: the app that must have written the checkpoint (``apps.X``); another app's checkpoint is refused.
        map_location: the device the module is moved to.
    """
    path = resolve_checkpoint(ckpt)
    checkpoint = read_checkpoint(path, app=app)
    cfg = OmegaConf.create(checkpoint["flowsuite_config"])
    if overrides:
        clean = {k: v for k, v in dict(overrides).items() if v is not None and not (hasattr(v, "__len__") and not v)}
        cfg = OmegaConf.merge(cfg, OmegaConf.create(OmegaConf.to_container(OmegaConf.create(clean), resolve=True)))
    module = build_module(cfg)
    module.run_config = checkpoint["flowsuite_config"]
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the model its config builds: {e}") from e
    module.to(map_location).eval()
    return Restored(module, cfg, path, int(checkpoint.get("global_step", 0)))
