"""Media for people to look at: files in the run directory, mirrored to W&B when that logger is active.

Every function writes nothing unless called on rank zero (the caller's job; ``FlowModule.log_samples`` is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["wandb_loggers", "log_image", "log_audio", "log_video", "log_point_cloud", "log_table"]


def wandb_loggers(trainer: Any) -> list[Any]:
    """The W&B loggers attached to ``trainer`` (none if W&B is not in use)."""
    if trainer is None:
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_image(trainer: Any, key: str, path: str | Path, caption: str | None = None) -> None:
    """Log a PNG/JPEG already written to ``path``."""
    extra = {"caption": [caption]} if caption else {}
    for lg in wandb_loggers(trainer):
        lg.log_image(key=key, images=[str(path)], step=trainer.global_step, **extra)


def log_audio(trainer: Any, key: str, path: str | Path, sample_rate: int) -> None:
    """Log a wav file already written to ``path``."""
    import wandb

    for lg in wandb_loggers(trainer):
        lg.experiment.log(
            {key: wandb.Audio(str(path), sample_rate=sample_rate), "trainer/global_step": trainer.global_step}
        )


def log_video(trainer: Any, key: str, path: str | Path, fps: float = 4.0) -> None:
    """Log a GIF/MP4 already written to ``path``."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    for lg in loggers:
        lg.experiment.log({key: wandb.Video(str(path), fps=fps), "trainer/global_step": trainer.global_step})


def log_point_cloud(trainer: Any, key: str, points: np.ndarray) -> None:
    """Log an (N, 3) point cloud as an interactive W&B 3-D object."""
    import wandb

    for lg in wandb_loggers(trainer):
        lg.experiment.log({key: wandb.Object3D(np.asarray(points)), "trainer/global_step": trainer.global_step})


def log_table(trainer: Any, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table (e.g. generated SMILES with their properties)."""
    for lg in wandb_loggers(trainer):
        lg.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)
