"""Checkpoints: the one writer, the one reader, and which file a run directory resumes from.

Every flowsuite checkpoint carries ``flowsuite`` metadata (format version, app, command) beside Lightning's own
entries and the resolved run config (``flowsuite_config``). Writing goes through :class:`SafeCheckpointIO`
(Lightning's checkpoint plugin, so ``ModelCheckpoint``, the exception checkpoint and the NaN guard all use it) or
:func:`save_checkpoint` (for commands that train without a Trainer); both

- refuse a checkpoint holding a NaN or infinite tensor (it would be a lie about "the last good weights"),
- never replace a checkpoint with one of an earlier global step (a failed resume cannot destroy progress),
- write atomically (a temporary file renamed into place), so a crash mid-write leaves the old file whole.

Reading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from core.paths import resolve_path

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "NonFiniteCheckpointError",
    "SafeCheckpointIO",
    "checkpoint_step",
    "find_latest_checkpoint",
    "metadata",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_KEY = "flowsuite"
CONFIG_KEY = "flowsuite_config"


class CheckpointError(ValueError):
    """A file that is not a usable flowsuite checkpoint (missing, empty, truncated, foreign, wrong app)."""


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint about to be written holds a NaN or infinite tensor; nothing was written."""


def metadata(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``flowsuite`` entry of a checkpoint: format version, and the app and command from the run config."""
    config = config or {}
    return {"format": FORMAT_VERSION, "app": config.get("app"), "command": config.get("command")}


# ---- reading ----------------------------------------------------------------------------------------------------
def _load(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``; every failure becomes a :class:`CheckpointError` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write that made it was cut off")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a complete PyTorch checkpoint, or one holding objects other than "
            f"tensors and plain values ({first})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def read_checkpoint(path: str | Path, app: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a flowsuite checkpoint file and check it: its format version, and (given ``app``) the app that wrote it."""
    path = Path(path)
    ckpt = _load(path, map_location)
    if CONFIG_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a flowsuite checkpoint (no '{CONFIG_KEY}' or 'state_dict' entry)")
    meta = ckpt.get(META_KEY) or metadata(ckpt[CONFIG_KEY])  # files of format 0 had no metadata entry
    version = meta.get("format", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}; this flowsuite reads format {FORMAT_VERSION} or older: update it"
        )
    written_by = meta.get("app")
    if app is not None and written_by is not None and written_by != app:
        raise CheckpointError(f"{path} was written by apps.{written_by}, not apps.{app}")
    ckpt[META_KEY] = meta
    return ckpt


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint file was written at (memory-mapped: cheap for large files)."""
    return int(_load(Path(path), mmap=True).get("global_step", 0))


def _checkpoint_files(run_dir: Path) -> Iterator[Path]:
    for folder in (run_dir / "checkpoints", run_dir):
        if folder.is_dir():
            yield from sorted(folder.glob("*.ckpt"))


def find_latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of ``run_dir`` with the highest global step (``last.ckpt`` can be older than
    ``interrupted.ckpt``); a tie goes to the most recently written file. Unreadable files are skipped with a warning."""
    run_dir = Path(run_dir)
    best: tuple[int, float, Path] | None = None
    for f in _checkpoint_files(run_dir):
        try:
            key = (checkpoint_step(f), f.stat().st_mtime, f)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        raise FileNotFoundError(f"ckpt: no readable *.ckpt file in run directory {run_dir} (or its checkpoints/)")
    return best[2]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its newest checkpoint by global step; the choice is logged). A relative
    path that does not exist from the working directory is looked up in the repository (shipped models)."""
    p = resolve_path(path)
    if p.is_dir():
        newest = find_latest_checkpoint(p)
        log.info("run directory %s: using its newest checkpoint %s (step %d)", p, newest, checkpoint_step(newest))
        return newest
    if not p.is_file():
        raise FileNotFoundError(f"ckpt: checkpoint file {p} does not exist")
    return p


# ---- writing ----------------------------------------------------------------------------------------------------
def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _non_finite(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors with a NaN or infinity in the weights (and the optimizer state)."""
    bad = []
    for part in ("state_dict", "optimizer_states"):
        for name, t in _tensors(checkpoint.get(part), part):
            if t.is_floating_point() or t.is_complex():
                if not torch.isfinite(t).all():
                    bad.append(name)
    return bad


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> bool:
    """Write ``checkpoint`` to ``path`` under the rules of this module. Returns False (and logs why) when an existing
    file at ``path`` holds a later global step and is kept; raises :class:`NonFiniteCheckpointError` on NaN/inf."""
    path = Path(path)
    bad = _non_finite(checkpoint)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteCheckpointError(f"refusing to write {path}: non-finite values in {shown}")
    step = int(checkpoint.get("global_step", 0))
    if path.is_file():
        try:
            existing = checkpoint_step(path)
        except CheckpointError:
            existing = -1  # a broken file may be replaced
        if existing > step:
            log.warning("kept %s (step %d): not replaced by a checkpoint of the earlier step %d", path, existing, step)
            return False
    checkpoint.setdefault(META_KEY, metadata(checkpoint.get(CONFIG_KEY)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with this module's rules: finite tensors only, no step going backwards, atomic
    writes, and ``weights_only=True`` loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: Any = None):
        return _load(Path(path), map_location)


def save_checkpoint(
    module: torch.nn.Module, path: str | Path, global_step: int, config: Mapping[str, Any] | None = None, **extra: Any
) -> bool:
    """Write a checkpoint of ``module`` outside a Trainer (same rules and layout as training checkpoints)."""
    config = config if config is not None else getattr(module, "run_config", None)
    if isinstance(config, DictConfig):  # plain containers only: weights_only loading refuses omegaconf objects
        config = OmegaConf.to_container(config, resolve=True)
    checkpoint = {"state_dict": module.state_dict(), "global_step": int(global_step), "epoch": 0, **extra}
    if config is not None:
        checkpoint[CONFIG_KEY] = dict(config)
        checkpoint[META_KEY] = metadata(config)
    return write_checkpoint(checkpoint, path)
