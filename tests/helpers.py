"""Helpers shared by the tests that train: composing shrunken configs and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.cli import compose

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def small_config(app: str, tmp_path: Path, *overrides: str, command: str = "train"):
    """The app's config with output into ``tmp_path``, no logger, no progress bar; ``overrides`` win."""
    return compose(app, command, [f"output_dir={tmp_path}", *QUIET, *overrides])


def run_cli(app: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m apps.<app> <args>`` in a subprocess; returns the completed process (output captured)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", f"apps.{app}", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def triton_test_device():
    """Where Triton kernels can be tested: a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``; else the test skips
    (CI has no Triton)."""
    import pytest
    import torch

    from core.kernels import triton, triton_available

    if triton is None:
        pytest.skip("Triton is not installed (it comes with CUDA builds of torch)")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if triton_available(torch.device("cpu")):
        return torch.device("cpu")
    pytest.skip("no CUDA device, and TRITON_INTERPRET=1 is not set")
