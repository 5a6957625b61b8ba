"""Optional Triton kernels: whether they can run on a device.

Triton ships with CUDA builds of PyTorch and is not a dependency of flowsuite; an app's Triton module defines its
kernels only when the import works. With ``TRITON_INTERPRET=1`` Triton's interpreter runs kernels on CPU tensors
(slowly), which is how the tests check them without a GPU. Importing this module imports Triton (slow): apps import
their kernel modules lazily.
"""

from __future__ import annotations

import os

import torch

try:  # Triton comes with CUDA builds of torch; CPU-only installs have none
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["triton", "triton_available"]


def triton_available(device: torch.device | None = None) -> bool:
    """Whether Triton kernels can run on ``device``: CUDA with Triton installed, or any device under
    ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and device.type == "cuda"
