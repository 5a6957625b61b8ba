"""approxmatch EMD (the EMD of PointFlow's table) as fused Triton kernels, for CUDA.

Same algorithm and level schedule as :func:`apps.pointflow.metrics.emd_approxmatch` (which documents it), but the
(B, N, M) kernel matrix ``K = exp(level * |ref_k - x_l|^2)`` is never stored: each pass recomputes its block of
distances from the coordinates in registers, so a pair costs O(N + M) memory and the work is bound by the
exponentials, not by memory traffic. Per level, three passes over the pairs of points:

    row pass 1:  ratio_L = remain_L / (1e-9 + K remain_R)
    column pass: s_R = (K^T ratio_L) * remain_R;  ratio_R = min(remain_R / (s_R + 1e-9), 1) * remain_R;
                 remain_R = max(remain_R - s_R, 0)
    row pass 2:  remain_L = max(remain_L - ratio_L * (K ratio_R), 0);  cost += ratio_L . ((K * d) ratio_R)

The cost is accumulated per (pair, row block) in a fixed order, so a call is deterministic. Agreement with the
torch version is to float32 rounding (the kernels use the GPU's fast exponential, as ``approxmatch.cu``).

Triton is not a dependency of flowsuite: it ships with CUDA builds of PyTorch. :func:`available` says whether this
path can run; with ``TRITON_INTERPRET=1`` the kernels also run (slowly) on CPU tensors, which is how the tests check
them without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from core.kernels import triton_available as available

try:  # Triton comes with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "emd_approxmatch_triton"]

MIN_BLOCK = 32  # the smallest tile side of the configurations below
_LOG2_E = 1.4426950408889634


if triton is not None:
    # Tile shapes and warps, timed and chosen on the first call per cloud size and amount of work (the passes update
    # their inputs in place, so the tuner restores them after each trial).
    _CONFIGS = [
        triton.Config({"BLOCK_K": bk, "BLOCK_L": bl}, num_warps=w)
        for bk, bl, w in ((64, 128, 8), (64, 64, 4), (128, 64, 8), (32, 128, 4))
    ]

    @triton.jit
    def _load_points(cloud_ptr, idx, mask):
        """x, y, z of the points ``idx`` of one (P, 3) cloud; 0 where ``mask`` is off."""
        pts = cloud_ptr + idx * 3
        return (
            tl.load(pts, mask=mask, other=0.0),
            tl.load(pts + 1, mask=mask, other=0.0),
            tl.load(pts + 2, mask=mask, other=0.0),
        )

    @triton.jit
    def _sq_dist(rx, ry, rz, xx, xy, xz):
        """Squared distances (BLOCK_K, BLOCK_L) by direct differences, as the CUDA kernel (d(p, p) == 0)."""
        dx = rx[:, None] - xx[None, :]
        dy = ry[:, None] - xy[None, :]
        dz = rz[:, None] - xz[None, :]
        return dx * dx + dy * dy + dz * dz

    @triton.jit
    def _row_pass(
        ref_ptr,  # (B, N, 3) float32
        x_ptr,  # (B, M, 3) float32
        vec_r_ptr,  # (B, M): remain_R (first pass) or ratio_R (second pass)
        remain_l_ptr,  # (B, N), read (first pass) or updated (second pass)
        ratio_l_ptr,  # (B, N), written (first pass) or read (second pass)
        cost_ptr,  # (B, cost_stride): per row block, its share of the cost, accumulated over the levels
        cost_stride,
        pairs_bucket,  # B rounded up to a power of two: the tuner's key (tiles are chosen per size of work)
        n: tl.constexpr,  # sizes are compile-time: one kernel per cloud size (2,048 in the tables)
        m: tl.constexpr,
        scale,  # level * log2(e): exp(level d2) = exp2(scale d2)
        SECOND: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1)
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < n
        rx, ry, rz = _load_points(ref_ptr + b * n * 3, ks, kmask)
        # element-wise accumulators, reduced once after the loop (no cross-thread sums inside it)
        acc = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
        acc_d = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
        for l0 in range(0, m, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            lmask = ls < m
            xx, xy, xz = _load_points(x_ptr + b * m * 3, ls, lmask)
            v = tl.load(vec_r_ptr + b * m + ls, mask=lmask, other=0.0)  # 0 past the end: no contribution
            d2 = _sq_dist(rx, ry, rz, xx, xy, xz)
            w = tl.exp2(d2 * scale) * v[None, :]
            acc += w
            if SECOND:
                acc_d += w * tl.sqrt(d2)
        row = tl.sum(acc, axis=1)
        if SECOND:
            ratio_l = tl.load(ratio_l_ptr + b * n + ks, mask=kmask, other=0.0)
            remain_l = tl.load(remain_l_ptr + b * n + ks, mask=kmask, other=0.0)
            tl.store(remain_l_ptr + b * n + ks, tl.maximum(remain_l - ratio_l * row, 0.0), mask=kmask)
            slot = cost_ptr + b * cost_stride + kb
            tl.store(slot, tl.load(slot) + tl.sum(ratio_l * tl.sum(acc_d, axis=1), axis=0))
        else:
            remain_l = tl.load(remain_l_ptr + b * n + ks, mask=kmask, other=0.0)
            tl.store(ratio_l_ptr + b * n + ks, remain_l / (row + 1e-9), mask=kmask)

    @triton.jit
    def _column_pass(
        ref_ptr,  # (B, N, 3) float32
        x_ptr,  # (B, M, 3) float32
        ratio_l_ptr,  # (B, N), read
        remain_r_ptr,  # (B, M), updated
        ratio_r_ptr,  # (B, M), written
        pairs_bucket,
        n: tl.constexpr,
        m: tl.constexpr,
        scale,
        BLOCK_K: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        lb = tl.program_id(1)
        ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        lmask = ls < m
        xx, xy, xz = _load_points(x_ptr + b * m * 3, ls, lmask)
        acc = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n
            rx, ry, rz = _load_points(ref_ptr + b * n * 3, ks, kmask)
            rl = tl.load(ratio_l_ptr + b * n + ks, mask=kmask, other=0.0)
            acc += tl.exp2(_sq_dist(rx, ry, rz, xx, xy, xz) * scale) * rl[:, None]
        col = tl.sum(acc, axis=0)
        remain_r = tl.load(remain_r_ptr + b * m + ls, mask=lmask, other=0.0)
        s_r = col * remain_r
        tl.store(ratio_r_ptr + b * m + ls, tl.minimum(remain_r / (s_r + 1e-9), 1.0) * remain_r, mask=lmask)
        tl.store(remain_r_ptr + b * m + ls, tl.maximum(remain_r - s_r, 0.0), mask=lmask)

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter cannot time configurations: the first one
        _row_tuned, _column_tuned, _FIXED = _row_pass, _column_pass, _CONFIGS[0].kwargs
    else:
        _row_tuned = triton.autotune(
            _CONFIGS, key=["pairs_bucket", "n", "m", "SECOND"], restore_value=["remain_l_ptr", "cost_ptr"]
        )(_row_pass)
        _column_tuned = triton.autotune(_CONFIGS, key=["pairs_bucket", "n", "m"], restore_value=["remain_r_ptr"])(
            _column_pass
        )
        _FIXED = {}


def emd_approxmatch_triton(ref: Tensor, x: Tensor, levels: tuple[float, ...]) -> Tensor:
    """approxmatch's match cost / N per pair: ref (B, N, 3), x (B, N, 3) float32 -> (B,) float32.

    ``levels`` is the schedule (``metrics._APPROXMATCH_LEVELS``). The caller checks shapes and equal sizes."""
    if triton is None:
        raise RuntimeError("emd_approxmatch_triton needs Triton (it comes with CUDA builds of PyTorch)")
    if ref.dtype != torch.float32 or x.dtype != torch.float32 or ref.shape[-1] != 3 or x.shape[-1] != 3:
        raise ValueError(f"emd_approxmatch_triton takes float32 (B, N, 3) clouds, got {ref.dtype} {tuple(ref.shape)}")
    ref, x = ref.contiguous(), x.contiguous()
    B, n, m = ref.shape[0], ref.shape[1], x.shape[1]
    if B == 0 or n == 0:
        return ref.new_zeros(B)
    remain_l = ref.new_full((B, n), float(max(m // n, 1)) if n < m else 1.0)
    remain_r = ref.new_full((B, m), float(n // max(m, 1)) if n >= m else 1.0)
    ratio_l, ratio_r = torch.empty_like(remain_l), torch.empty_like(remain_r)
    cost_stride = triton.cdiv(n, MIN_BLOCK)  # one slot per row block of any tile shape
    cost = ref.new_zeros((B, cost_stride))

    def rows(meta: dict) -> tuple[int, int]:
        return (B, triton.cdiv(n, meta["BLOCK_K"]))

    def cols(meta: dict) -> tuple[int, int]:
        return (B, triton.cdiv(m, meta["BLOCK_L"]))

    bucket = min(1 << (B - 1).bit_length(), 1 << 16)
    for level in levels:
        scale = level * _LOG2_E
        row_args = (ref, x, remain_r, remain_l, ratio_l, cost, cost_stride, bucket, n, m, scale)
        _row_tuned[rows](*row_args, SECOND=False, **_FIXED)
        _column_tuned[cols](ref, x, ratio_l, remain_r, ratio_r, bucket, n, m, scale, **_FIXED)
        _row_tuned[rows](ref, x, ratio_r, remain_l, ratio_l, cost, cost_stride, bucket, n, m, scale, SECOND=True,
                         **_FIXED)  # fmt: skip
    return cost.sum(1) / n
