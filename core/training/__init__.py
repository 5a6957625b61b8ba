"""The shared training stack: FlowModule, ``fit`` (the first half of a run), ``restore`` (the second), checkpoints
and media logging."""

from core.training.checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint, save_checkpoint
from core.training.module import FlowModule, NonFiniteLossError
from core.training.runner import (
    FitResult,
    Restored,
    build_module,
    build_trainer,
    command_loggers,
    finish_wandb,
    fit,
    restore,
)

__all__ = [
    "CheckpointError",
    "FlowModule",
    "NonFiniteLossError",
    "FitResult",
    "Restored",
    "build_module",
    "build_trainer",
    "command_loggers",
    "finish_wandb",
    "fit",
    "read_checkpoint",
    "resolve_checkpoint",
    "restore",
    "save_checkpoint",
]
