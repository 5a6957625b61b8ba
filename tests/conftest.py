"""Shared test set-up: quiet, offline, deterministic, and CPU-only."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# FLOWSUITE_TEST_THREADS lets several test runs share a small machine without oversubscribing it
torch.set_num_threads(int(os.environ.get("FLOWSUITE_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
