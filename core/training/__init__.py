"""The shared training stack: FlowModule, the config-driven runner, checkpoints and media logging."""

from core.training.module import FlowModule, NonFiniteLossError
from core.training.runner import FitResult, build_module, build_trainer, fit, load_checkpoint, resolve_checkpoint

__all__ = [
    "FlowModule",
    "NonFiniteLossError",
    "FitResult",
    "build_module",
    "build_trainer",
    "fit",
    "load_checkpoint",
    "resolve_checkpoint",
]
