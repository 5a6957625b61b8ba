"""WaveFlow's conditioner layer for one row of synthesis as one fused Triton kernel, for CUDA.

:class:`apps.waveflow.model.RowStepper` computes a layer's output row with about eight kernels (three GEMMs for the
width convolution, tanh, GLU, the skip GEMM, the residual add and GEMM); a GPU run of the ``(h - 1) x n_flows x
n_layers`` row steps is bound by their launches. :func:`layer_row` does the same arithmetic in one kernel: each
program takes a block of columns of one batch row and

    a      = cond + sum_{kw, r} W[kw, :, r] @ X_r[:, t + (kw - k // 2) dw]      (k x k taps, "same" zeros along width)
    y      = tanh(a[:C]) * sigmoid(a[C:])
    skip  += W_skip @ y                                                          (the 2 output channels, in place)
    next   = X_{k-1}[:, t] + b_res + W_res @ y                                   (the next layer's input row)

with ``X_r`` the layer's input row ``j + r dh`` read from its history (B, pad + rows, C, W) and ``cond`` its mel
projection with every bias folded in. Products run on tensor cores with float32 accumulation (``ieee`` float32
products for float32 models, so that the CPU tests can compare to 1e-5). The residual channels ``C`` must be a power
of two, at least 16 (``tl.dot``'s smallest side): the paper's 64 and 128 are.

Triton is not a dependency of flowsuite: it ships with CUDA builds of PyTorch. :func:`available` says whether this
path can run; with ``TRITON_INTERPRET=1`` the kernel also runs (slowly) on CPU tensors, which is how the tests check
it without a GPU. Not yet timed on a GPU (see the README).
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

__all__ = ["available", "supports", "layer_row"]

BLOCK_W: int | None = None  # columns per program; None: tuned per width on the first call (tests set it)
SKIP_ROWS = 16  # the skip projection's 2 output channels, padded to tl.dot's smallest side


def supports(channels: int) -> bool:
    """Whether ``channels`` residual channels fit the kernel's tiles (a power of two, at least 16)."""
    return channels >= 16 and channels & (channels - 1) == 0


if triton is not None:

    @triton.jit
    def _tanh(x):
        """tanh from one exponential (``tl`` has no tanh on every backend); exact limits at +-inf."""
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _layer_row_kernel(
        hist_ptr, cond_ptr, w_ptr, wskip_ptr, skip_ptr, wres_ptr, bres_ptr, next_ptr,
        row0, width, dh, dw,
        s_hb, s_hr, s_cb, s_cc, s_cw, s_sb, s_nb,
        C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr, SKIP: tl.constexpr,
        HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_w, b = tl.program_id(0), tl.program_id(1)
        cols = pid_w * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) output columns
        ch = tl.arange(0, C)  # (C,)
        col_ok = cols < width
        hist = hist_ptr + b * s_hb
        acc_t = tl.zeros((C, BLOCK), dtype=tl.float32)  # tanh half of a
        acc_s = tl.zeros((C, BLOCK), dtype=tl.float32)  # sigmoid half
        x_last = tl.zeros((C, BLOCK), dtype=tl.float32)
        for kw in tl.static_range(KW):
            src = cols + (kw - KW // 2) * dw  # the input columns this tap reads
            src_ok = (src >= 0) & (src < width)
            for r in tl.static_range(KH):
                rows = hist + (row0 + r * dh) * s_hr  # (C, W) input row j + r dh, channels contiguous by width
                x = tl.load(rows + ch[:, None] * width + src[None, :], mask=src_ok[None, :], other=0.0)
                if kw == KW // 2 and r == KH - 1:
                    x_last = x.to(tl.float32)  # this layer's own input row: the residual
                # W[kw] is (2C, KH C): rows [0, C) tanh half, [C, 2C) sigmoid half; columns r C + c
                wt = tl.load(w_ptr + kw * 2 * C * KH * C + ch[:, None] * (KH * C) + r * C + ch[None, :])
                ws = tl.load(w_ptr + kw * 2 * C * KH * C + (C + ch[:, None]) * (KH * C) + r * C + ch[None, :])
                acc_t = tl.dot(wt, x, acc_t, input_precision=PRECISION)
                acc_s = tl.dot(ws, x, acc_s, input_precision=PRECISION)
        cond = cond_ptr + b * s_cb + cols[None, :] * s_cw
        acc_t += tl.load(cond + ch[:, None] * s_cc, mask=col_ok[None, :], other=0.0).to(tl.float32)
        acc_s += tl.load(cond + (C + ch[:, None]) * s_cc, mask=col_ok[None, :], other=0.0).to(tl.float32)
        y = (_tanh(acc_t) * tl.sigmoid(acc_s)).to(wskip_ptr.dtype.element_ty)  # (C, BLOCK)
        # skip (2 channels, padded to SKIP rows of zeros in W_skip) accumulates in place
        srow = tl.arange(0, SKIP)
        wskip = tl.load(wskip_ptr + srow[:, None] * C + ch[None, :])
        skip_ptrs = skip_ptr + b * s_sb + srow[:, None] * width + cols[None, :]
        skip_mask = (srow[:, None] < 2) & col_ok[None, :]
        skip = tl.load(skip_ptrs, mask=skip_mask, other=0.0).to(tl.float32)
        skip = tl.dot(wskip, y, skip, input_precision=PRECISION)
        tl.store(skip_ptrs, skip.to(skip_ptr.dtype.element_ty), mask=skip_mask)
        if HAS_RES:
            wres = tl.load(wres_ptr + ch[:, None] * C + ch[None, :])
            nxt = x_last + tl.load(bres_ptr + ch).to(tl.float32)[:, None]
            nxt = tl.dot(wres, y, nxt, input_precision=PRECISION)
            tl.store(next_ptr + b * s_nb + ch[:, None] * width + cols[None, :],
                     nxt.to(next_ptr.dtype.element_ty), mask=col_ok[None, :])  # fmt: skip


if triton is not None:
    # columns per program and warps, timed and chosen on the first call per width (the kernel accumulates into skip,
    # so the tuner restores it after each trial); the interpreter cannot time them and takes the first
    _CONFIGS = [triton.Config({"BLOCK": bw}, num_warps=w) for bw, w in ((64, 4), (32, 4), (128, 8), (64, 8), (32, 2))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        _tuned, _FIXED = _layer_row_kernel, _CONFIGS[0].kwargs
    else:
        _tuned = triton.autotune(_CONFIGS, key=["width", "C", "KH", "KW"], restore_value=["skip_ptr"])(
            _layer_row_kernel
        )
        _FIXED = {}


def layer_row(
    history: Tensor,
    row0: int,
    dh: int,
    dw: int,
    cond: Tensor,
    w_taps: Tensor,
    w_skip: Tensor,
    skip: Tensor,
    w_res: Tensor | None,
    b_res: Tensor | None,
    next_row: Tensor | None,
) -> None:
    """One conditioner layer's output row, in place (see the module docstring).

    history (B, pad + rows, C, W): the layer's input rows, ``row0 + r dh`` (r < KH) the window; cond (B, 2C, W), or
    any tensor that broadcasts to it (a bias (1, 2C, 1)); w_taps (KW, 2C, KH C); w_skip (16, C) with rows 2.. zero;
    skip (B, 2, W) contiguous, accumulated into; w_res (C, C), b_res (C,) and next_row (B, C, W) with contiguous
    (C, W) (the next layer's history row) for every layer but the last (None there).
    """
    batch, _, channels, width = history.shape
    kw, _, khc = w_taps.shape
    kh = khc // channels
    if history.stride(3) != 1 or history.stride(2) != width:
        raise ValueError("layer_row: history rows must be contiguous (C, W) blocks")
    if skip.stride(2) != 1 or skip.stride(1) != width:
        raise ValueError("layer_row: skip must be a contiguous (B, 2, W)")
    cond = cond.expand(batch, 2 * channels, width)
    has_res = next_row is not None
    if has_res and (next_row.stride(2) != 1 or next_row.stride(1) != width):
        raise ValueError("layer_row: next_row must hold contiguous (C, W) rows")
    precision = "ieee" if history.dtype == torch.float32 else "tf32"
    args = (
        history, cond, w_taps, w_skip, skip,
        w_res if has_res else w_skip, b_res if has_res else w_skip, next_row if has_res else skip,
        row0, width, dh, dw,
        history.stride(0), history.stride(1), cond.stride(0), cond.stride(1), cond.stride(2), skip.stride(0),
        next_row.stride(0) if has_res else 0,
    )  # fmt: skip
    fixed = dict(C=channels, KH=kh, KW=kw, SKIP=SKIP_ROWS, HAS_RES=has_res, PRECISION=precision)
    if BLOCK_W is not None:
        _layer_row_kernel[(triton.cdiv(width, BLOCK_W), batch)](*args, **fixed, BLOCK=BLOCK_W)
    else:
        _tuned[lambda meta: (triton.cdiv(width, meta["BLOCK"]), batch)](*args, **fixed, **_FIXED)
