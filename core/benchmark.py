"""Small helpers the benchmark scripts share: wait for the device, and the peak memory of this process."""

from __future__ import annotations

import resource

import torch

__all__ = ["sync", "peak_memory_mb"]


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak allocated GPU memory on CUDA (reset it with ``torch.cuda.reset_peak_memory_stats``), else the peak
    resident set size of this process, in MiB."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
