"""Where things are: the repository root and the one rule for resolving a user's relative path."""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO_ROOT", "resolve_path"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """``path`` as given when it exists (or is absolute), else relative to the repository root when it exists there.

    Commands write into Hydra's run directory but read data from where the user stands or from the repository
    (``data/...``), so the built-in data is found from any working directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p
