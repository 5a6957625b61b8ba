"""Callbacks the shared stack adds to Lightning's: the checkpoint a run leaves when it dies."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from core.training.checkpoint import NonFiniteCheckpointError

__all__ = ["InterruptCheckpoint", "resume_command"]

log = logging.getLogger(__name__)

# overrides that name this run's place or its resume point: the resume command sets its own
_RUN_KEYS = ("hydra.run.dir", "output_dir", "ckpt_path")


def resume_command(ckpt: str | Path, argv: list[str] | None = None) -> str:
    """The shell command that resumes this run from ``ckpt``: the same ``python -m apps.X train`` and overrides."""
    argv = list(sys.argv if argv is None else argv)
    module = "apps.<app>"
    if argv and argv[0].endswith("__main__.py"):
        module = ".".join(Path(argv[0]).resolve().parent.parts[-2:])
    kept = [a for a in argv[1:] if a.split("=", 1)[0].lstrip("+~") not in _RUN_KEYS]
    return shlex.join(["python", "-m", module, *kept, f"ckpt_path={ckpt}"])


class InterruptCheckpoint(pl.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when training dies (Ctrl-C, an exception), and says how to resume.

    Nothing is written when no optimizer step ran in this process (e.g. a resume that failed at start-up): the run
    directory's checkpoints stay as they were. The checkpoint writer never replaces a file of a later step.
    """

    def __init__(self, dirpath: str | Path, filename: str = "interrupted") -> None:
        self.dirpath, self.filename = Path(dirpath), filename
        self._start_step: int | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # after a resume has restored the loops

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            if trainer.is_global_zero:
                log.warning("no training step ran in this run: no %s written", self.ckpt_path.name)
            return
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except NonFiniteCheckpointError as e:
            log.error("%s; resume from the newest checkpoint in %s instead", e, self.dirpath)
            return
        if trainer.is_global_zero and isinstance(exception, KeyboardInterrupt):
            msg = (
                f"\nInterrupted at step {trainer.global_step}. Checkpoint: {self.ckpt_path}\n"
                f"Resume with:\n  {resume_command(self.ckpt_path)}\n"
            )
            print(msg, file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {}
