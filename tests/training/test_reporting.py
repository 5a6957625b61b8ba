"""The metrics table every evaluate command prints, and the device choice every command makes."""

from __future__ import annotations

import torch

from core.training.reporting import print_metrics, resolve_device


def test_print_metrics_formats_floats_skips_lists_and_takes_a_custom_view(capsys):
    print_metrics("t", {"nll": 1.234567, "n": 7, "per_shape": [1.0, 2.0], "cov": 0.5}, fmt=".3f",
                  show=lambda k, v: f"{100 * v:.1f} %" if k == "cov" else None)  # fmt: skip
    out = capsys.readouterr().out
    assert "1.235" in out and "1.234567" not in out
    assert " 7 " in out or "│ 7" in out
    assert "per_shape" not in out, "lists belong in metrics.json, not in the table"
    assert "50.0 %" in out


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
