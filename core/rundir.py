"""One run, one directory: a command claims its run directory and never writes into another run's.

A command writes ``.flowsuite-run.json`` (app, command, start time) into its output directory. A directory that
already holds another run's outputs is refused with an error naming it; with ``overwrite=true`` a directory that holds
an earlier run of the *same* app and command is cleared first (an ``evaluate`` can never clear a training run).
A run resumed from a checkpoint inside the directory is refused there too, with a message: it writes to a new
directory, so that the earlier run's logs (its CSV file, W&B run) and outputs are never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MARKER", "RunDirError", "check_run_dir", "claim_run_dir", "is_worker_rank"]

MARKER = ".flowsuite-run.json"
_HYDRA_FILES = (".hydra",)  # what Hydra itself writes into the run dir before the command starts


class RunDirError(RuntimeError):
    """The output directory belongs to another run."""


def is_worker_rank() -> bool:
    """True in a DDP worker process (Lightning's re-launched ranks, torchrun or SLURM ranks > 0): they share rank
    zero's run directory and leave its claim to rank zero."""
    return any(os.environ.get(v, "0") != "0" for v in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def _owner(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _foreign_entries(folder: Path) -> list[Path]:
    """What ``folder`` holds besides the marker and what Hydra writes at every start (``.hydra/``, ``*.log``; other
    DDP ranks may have written them already)."""
    return sorted(p for p in folder.iterdir() if p.name not in _HYDRA_FILES and p.suffix != ".log" and p.name != MARKER)


def check_run_dir(
    folder: str | Path,
    app: str,
    command: str,
    overwrite: bool,
    reads: Iterable[str | Path] = (),
    resumes: str | Path | None = None,
) -> bool:
    """Raise :class:`RunDirError` if ``folder`` holds another run's outputs. Returns True when the folder holds an
    earlier run of the same app and command that ``overwrite=true`` allows to clear: never when the command reads
    one of ``reads`` (its checkpoint, its inputs) from inside the folder, which clearing would delete. A run that
    ``resumes`` from a checkpoint inside the folder is refused with a message saying where it should write."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    owner = _owner(folder)
    entries = _foreign_entries(folder)
    if owner is None and not entries:
        return False
    same = owner is not None and (owner.get("app"), owner.get("command")) == (app, command)
    if same and resumes and not overwrite and _is_within(Path(resumes), folder):
        # continuing in place would replace the earlier run's logs (Lightning's CSV logger rewrites metrics.csv)
        raise RunDirError(
            f"{folder} holds the run that ckpt_path={resumes} resumes; a resumed run writes to a new directory so "
            "that the earlier run's logs and outputs stay as they are: leave output_dir / hydra.run.dir at their "
            "defaults"
        )
    if same and overwrite:
        inside = [str(r) for r in reads if _is_within(Path(r), folder)]
        if inside:
            raise RunDirError(
                f"overwrite=true would clear {folder}, but this command reads {', '.join(inside)} from it; "
                "write to a new directory (leave hydra.run.dir / output_dir at their defaults)"
            )
        return True
    who = f"apps.{owner.get('app')} {owner.get('command')}" if owner else "files of another run"
    hint = " (or pass overwrite=true to replace that earlier run)" if owner and owner.get("command") == command else ""
    shown = ", ".join(p.name for p in entries[:5]) or MARKER
    raise RunDirError(
        f"output directory {folder} already holds the outputs of {who} ({shown}); apps.{app} {command} does not "
        f"write into another run's directory. Leave hydra.run.dir / output_dir at their defaults, or choose a new "
        f"directory{hint}."
    )


def _is_within(path: Path, folder: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def claim_run_dir(
    folder: str | Path,
    app: str,
    command: str,
    overwrite: bool = False,
    reads: Iterable[str | Path] = (),
    resumes: str | Path | None = None,
) -> None:
    """Check ``folder`` (see :func:`check_run_dir`), clear an earlier run of this command if allowed, and mark it."""
    folder = Path(folder)
    if check_run_dir(folder, app, command, overwrite, reads, resumes):
        for p in _foreign_entries(folder):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"app": app, "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
