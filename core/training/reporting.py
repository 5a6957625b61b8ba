"""What every command shares at the end of a run: the device it runs on and a table of its metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

__all__ = ["resolve_device", "print_metrics"]


def resolve_device(want: str | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU; anything else is passed to ``torch.device``."""
    if want in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def print_metrics(
    title: str, values: Mapping[str, Any], fmt: str = ".4g", show: Callable[[str, Any], str | None] | None = None
) -> None:
    """A two-column rich table of ``values``; floats use ``fmt``, lists and dicts are left to metrics.json.

    ``show(key, value)`` may return the text for a row (e.g. a value in the paper's units) or None for the default.
    """
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in values.items():
        if isinstance(value, (list, tuple, dict)):
            continue
        text = show(key, value) if show is not None else None
        if text is None:
            text = format(value, fmt) if isinstance(value, float) else str(value)
        table.add_row(key, text)
    Console().print(table)
