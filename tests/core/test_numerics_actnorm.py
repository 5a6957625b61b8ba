"""ActNorm's data-dependent initialisation with centred (two-pass) statistics, on one process and across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.flows import ActNorm


def _init(x: torch.Tensor) -> ActNorm:
    layer = ActNorm(x.shape[1]).train()
    with torch.no_grad():
        layer(x)
    return layer


@pytest.mark.parametrize("shape", [(4096, 3), (64, 3, 8, 8)], ids=["vector", "image"])
def test_numerics_actnorm_init_with_large_mean_and_small_std(shape):
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + 0.5 * torch.randn(*shape, generator=g)  # float32, as in training
    layer = _init(x)
    with torch.no_grad():
        z, _ = layer(x)
    dims = [d for d in range(z.dim()) if d != 1]
    torch.testing.assert_close(z.double().mean(dims), torch.zeros(3, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.double().std(dims, unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-3, rtol=0)  # fmt: skip


def test_numerics_actnorm_init_of_tiny_spread_is_not_cancelled_to_zero():
    x = torch.full((256, 2), 3000.0)
    x[::2] += 0.25  # std 0.125 exactly; E[x^2] - mean^2 cancels in float32
    layer = _init(x)
    torch.testing.assert_close(layer.log_std.detach(), torch.full((2,), 0.125).log(), atol=1e-4, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, parts: list[torch.Tensor], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(parts))
    try:
        layer = _init(parts[rank])
        out[rank] = (layer.bias.detach().clone(), layer.log_std.detach().clone())
    finally:
        dist.destroy_process_group()


def test_numerics_actnorm_init_across_ranks_is_count_weighted():
    """Two ranks with unequal batches (a last, short batch) give the statistics of the concatenated data."""
    g = torch.Generator().manual_seed(1)
    parts = [500.0 + 0.1 * torch.randn(48, 2, 3, 3, generator=g), 500.2 + 0.3 * torch.randn(8, 2, 3, 3, generator=g)]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(_free_port(), parts, out), nprocs=2, join=True, start_method="spawn")
        results = dict(out)
    whole = torch.cat(parts).double()
    mean = whole.mean(dim=(0, 2, 3))
    std = whole.std(dim=(0, 2, 3), unbiased=False)
    for rank in (0, 1):
        bias, log_std = results[rank]
        torch.testing.assert_close(bias.double(), mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(log_std.double(), std.log(), atol=1e-4, rtol=0)
