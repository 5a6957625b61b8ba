"""WaveFlow (Ping et al. 2020, arXiv:1912.01219) on ``core``: the squeeze, the 2-D WaveNet conditioner, the
affine autoregressive layer along height with its cached fast inverse, the mel upsampler and the whole model.

Layout. A waveform ``x`` (B, T) is squeezed into an ``h x (T / h)`` matrix ``X[i, j] = x[j * h + i]``: a column
holds ``h`` consecutive samples, a row every ``h``-th sample. Each :class:`WaveFlowLayer` is

    z[i, j] = x[i, j] * exp(log_s[i, j]) + t[i, j],   (log_s, t)[i, :] = WN2D(X[<i, :], c)[i, :]

along its own order of the rows (the paper's permutations), where ``WN2D`` is a stack of dilated 2-D
convolutions, causal along height and non-causal along width. ``forward`` (density, training) is one parallel
pass; ``inverse`` (sampling) takes ``h`` sequential steps, each computing one row of every convolution from a
cache of the rows above (:meth:`WaveFlowLayer.inverse`); :meth:`WaveFlowLayer.inverse_naive` recomputes the
whole matrix at every step and is kept as the reference the fast path is tested against.

References:
    Ping, Peng, Zhao, Song. WaveFlow: A Compact Flow-based Model for Raw Audio. ICML 2020.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from core.distributions import FlowModel
from core.flows.affine import affine_forward, affine_inverse
from core.flows.base import Flow, Sequential

__all__ = [
    "squeeze",
    "unsqueeze",
    "weight_norm",
    "fold_weight_norm",
    "upsample_factors_for",
    "RowStepper",
    "HeightSqueeze",
    "height_orders",
    "default_height_dilations",
    "WaveNet2D",
    "WaveFlowLayer",
    "MelUpsampler",
    "LatentNormal",
    "WaveFlow",
]

_LOG_2PI = math.log(2 * math.pi)

# Dilations along height of the 8 conditioner layers, from the official release (Parakeet) by h.
PAPER_HEIGHT_DILATIONS = {
    8: [1, 1, 1, 1, 1, 1, 1, 1],
    16: [1, 1, 1, 1, 1, 1, 1, 1],
    32: [1, 2, 4, 1, 2, 4, 1, 2],
    64: [1, 2, 4, 8, 16, 1, 2, 4],
}


def squeeze(x: Tensor, height: int) -> Tensor:
    """(..., T) -> (..., h, T / h) with ``out[..., i, j] = x[..., j * h + i]``."""
    if x.shape[-1] % height:
        raise ValueError(f"squeeze: length {x.shape[-1]} is not a multiple of the height h={height}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // height, height).transpose(-1, -2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze`: (..., h, W) -> (..., h * W)."""
    return x.transpose(-1, -2).reshape(*x.shape[:-2], -1)


class HeightSqueeze(Flow):
    """The squeeze as a flow: (B, T) -> (B, h, T / h), volume preserving (log-det 0)."""

    def __init__(self, height: int) -> None:
        super().__init__()
        self.height = height

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return squeeze(x, self.height), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if z.shape[1] != self.height:
            raise ValueError(f"HeightSqueeze.inverse: expected (B, {self.height}, W), got {tuple(z.shape)}")
        return unsqueeze(z), z.new_zeros(z.shape[0])


def height_orders(height: int, n_flows: int, permutation: str = "paper") -> list[list[int]]:
    """The row order each flow is autoregressive in (``order[k]`` = the original row at position ``k``).

    The paper permutes the rows after every flow: reverse after the first ``n_flows / 2`` flows, the bipartite
    reverse (each half reversed on its own) after the others. Applied cumulatively as in the reference code, the
    flows see the orders identity, reverse, identity, reverse, ..., then identity, bipartite, identity, ...
    ``permutation="reverse"`` reverses after every flow, ``"none"`` keeps the natural order everywhere.
    """
    rows = list(range(height))
    half = height // 2
    bipartite = rows[:half][::-1] + rows[half:][::-1]
    if permutation not in ("paper", "reverse", "none"):
        raise ValueError(f"permutation={permutation!r}: choose paper, reverse or none")
    state, orders = rows, []
    for k in range(n_flows):
        orders.append(list(state))
        if permutation == "none":
            continue
        perm = rows[::-1] if (permutation == "reverse" or k < n_flows // 2) else bipartite
        state = [state[p] for p in perm]
    return orders


def default_height_dilations(height: int, n_layers: int) -> list[int]:
    """The paper's dilations for 8 layers; otherwise 1, 2, 4, ... (cycled) up to the first that covers h."""
    if n_layers == 8 and height in PAPER_HEIGHT_DILATIONS:
        return list(PAPER_HEIGHT_DILATIONS[height])
    cycle, d = [], 1
    while True:
        cycle.append(d)
        if 1 + 2 * sum(cycle) >= height or 2 * d >= height:
            break
        d *= 2
    return [cycle[i % len(cycle)] for i in range(n_layers)]


def weight_norm(conv: nn.Module) -> nn.Module:
    """Weight normalisation (Salimans & Kingma 2016), ``w = g v / |v|`` per output channel, as both references put
    on every convolution but the zero-initialised output; :func:`fold_weight_norm` removes it for synthesis."""
    return nn.utils.parametrizations.weight_norm(conv, dim=0)


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Replace every weight-normalised ``(g, v)`` pair in ``module`` by the weight it stands for (in place): the same
    function, one parameter per convolution, no norm recomputed at every call (what synthesis wants)."""
    for m in list(module.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module


class _ConvGate(torch.autograd.Function):
    """One conditioner layer's dilated convolution, mel projection and gate as one autograd node (training):

        a = conv(padded, weight, bias) + mel @ w_mel^T,   y = tanh(a[:, :C]) * sigmoid(a[:, C:])

    ``padded`` (B, C, rows + pad_h, W + 2 pad_w) is the layer input already padded (the convolution pads nothing),
    channels-last in memory; ``mel`` (B rows W, M) the context rows or None; ``w_mel`` (2C, M). Returns ``y``
    (B rows W, C). The mel projection accumulates in place into the convolution's output, which only this node
    sees (as separate nodes, the in-place add on a view of it made autograd copy the gradient three times); the
    backward writes the gradient of ``a`` into one (B rows W, 2C) tensor and calls the convolution's backward on
    it. Keeps ``padded``, tanh and sigmoid as the separate nodes did, and references to the mel rows and weights
    (cast copies under autocast, as autocast's own GEMM kept). First-order only (training needs no more).
    Under autocast (``trainer.precision=bf16-mixed``) everything runs in the autocast dtype, as the convolution
    and GEMMs would on their own; the gradients return in their inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, padded: Tensor, weight: Tensor, bias: Tensor, mel: Tensor | None, w_mel: Tensor | None,
                dilation: tuple[int, int]) -> Tensor:  # fmt: skip
        device = padded.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            padded, weight, bias = padded.to(dtype), weight.to(dtype), bias.to(dtype)
            if mel is not None:
                mel, w_mel = mel.to(dtype), w_mel.to(dtype)
        with torch.autocast(device, enabled=False):
            a = F.conv2d(padded, weight, bias, dilation=dilation)  # (B, 2C, rows, W)
            batch, c2, rows, width = a.shape
            a = a.permute(0, 2, 3, 1).reshape(-1, c2)  # (B rows W, 2C): a view when the output is channels-last
            if mel is not None:
                a.addmm_(mel, w_mel.t())
            t, s = torch.tanh(a[:, : c2 // 2]), torch.sigmoid(a[:, c2 // 2 :])
        ctx.save_for_backward(padded, weight, mel, w_mel, t, s)
        ctx.dilation, ctx.out_shape = dilation, (batch, rows, width, c2)
        return t * s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        padded, weight, mel, w_mel, t, s = ctx.saved_tensors
        c = t.shape[1]
        grad = g.new_empty(g.shape[0], 2 * c)  # d/da
        gs = g * s
        torch.mul(gs, torch.addcmul(t.new_ones(()), t, t, value=-1), out=grad[:, :c])  # g s (1 - t^2)
        gs.mul_(t)
        torch.addcmul(gs, gs, s, value=-1, out=grad[:, c:])  # g t s (1 - s)
        needs = ctx.needs_input_grad
        grad_mel = grad @ w_mel if mel is not None and needs[3] else None
        grad_w_mel = grad.t() @ mel if mel is not None and needs[4] else None
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.view(ctx.out_shape).permute(0, 3, 1, 2), padded, weight, [weight.shape[0]], [1, 1], [0, 0],
            list(ctx.dilation), False, [0, 0], 1, [needs[0], needs[1], needs[2]],
        )  # fmt: skip
        return grad_in, grad_w, grad_b, grad_mel, grad_w_mel, None


class _Block(nn.Module):
    """One gated residual layer: dilated 3x3 conv (causal in height), + mel projection, tanh * sigmoid, 1x1 to the
    residual and skip halves. The last layer of a stack has no residual half (nothing reads it): ``last=True``."""

    def __init__(self, channels: int, dilation_h: int, dilation_w: int, kernel: int = 3, last: bool = False) -> None:
        super().__init__()
        self.dh, self.dw, self.k, self.last, self.channels = dilation_h, dilation_w, kernel, last, channels
        self.conv = weight_norm(nn.Conv2d(channels, 2 * channels, kernel))
        self.out = weight_norm(nn.Conv2d(channels, channels if last else 2 * channels, 1))

    @property
    def pad_h(self) -> int:
        return (self.k - 1) * self.dh

    def gate(self, a: Tensor, cond: Tensor | None) -> tuple[Tensor | None, Tensor]:
        if cond is not None:
            a = a + cond
        content, gate = a.chunk(2, dim=1)
        out = self.out(torch.tanh(content) * torch.sigmoid(gate))
        if self.last:
            return None, out  # skip only
        return out[:, : self.channels], out[:, self.channels :]  # residual, skip

    def step(self, window: Tensor, cond: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """One output row from the ``k`` input rows it sees, already gathered: (B, C, k, W) -> (B, C, 1, W) x2."""
        a = F.conv2d(
            window, self.conv.weight, self.conv.bias, padding=(0, self.dw * (self.k - 1) // 2), dilation=(1, self.dw)
        )
        return self.gate(a, cond)


class WaveNet2D(nn.Module):
    """WaveFlow's conditioner: 1x1 in, ``n_layers`` gated dilated 2-D conv layers with skips, 1x1 out to 2 maps.

    Dilations: ``dilations_h`` along height (causal), ``2 ** i`` along width (non-causal). Every convolution is
    weight-normalised except the output one, which is zero-initialised so that every flow starts as the identity;
    the last layer has no residual half. Input (B, 1, rows, W), context (B, context_channels, rows, W); output
    (B, 2, rows, W) = (log_s, t), row ``r`` depending on input rows ``<= r`` and context row ``r`` only.
    """

    def __init__(
        self,
        channels: int = 64,
        n_layers: int = 8,
        context_channels: int = 80,
        dilations_h: Sequence[int] = (1,) * 8,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        if len(dilations_h) != n_layers:
            raise ValueError(f"WaveNet2D: {len(dilations_h)} height dilations for {n_layers} layers")
        if kernel % 2 != 1:
            raise ValueError(f"WaveNet2D: kernel must be odd (same padding along width), got {kernel}")
        self.channels, self.n_layers, self.context_channels = channels, n_layers, context_channels
        self.start = weight_norm(nn.Conv2d(1, channels, 1))
        self.blocks = nn.ModuleList(
            _Block(channels, int(d), 2**i, kernel, last=i == n_layers - 1) for i, d in enumerate(dilations_h)
        )
        # the mel projections of all layers as one 1x1 conv (one GEMM instead of n_layers small ones); weight norm per
        # output channel is the same function as one weight norm per layer's projection
        self.cond = weight_norm(nn.Conv2d(context_channels, n_layers * 2 * channels, 1)) if context_channels else None
        self.end = nn.Conv2d(channels, 2, 1)
        nn.init.zeros_(self.end.weight)
        nn.init.zeros_(self.end.bias)

    def _check_context(self, context: Tensor | None) -> None:
        if self.cond is not None and context is None:
            raise ValueError(f"WaveNet2D was built with context_channels={self.context_channels} but got no context")

    def _conds(self, context: Tensor | None) -> list[Tensor | None]:
        self._check_context(context)
        if self.cond is None:
            return [None] * self.n_layers
        return list(self.cond(context).chunk(self.n_layers, dim=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The parallel pass (training, density): (B, 1, rows, W), (B, context_channels, rows, W) -> (B, 2, rows, W).

        The same function as the module structure says (``step`` computes it row by row), arranged for speed on the
        CPU (oneDNN):
        - activations are channels-last, (B, rows, W, C) in memory: oneDNN's dilated convolutions run 1.3-1.5x
          faster so, and every 1x1 convolution is one GEMM over all B rows W positions;
        - each layer's input is padded once, causally along height and by its dilation along width, and the
          convolution itself pads nothing (with the padding inside the convolution oneDNN's weight gradient takes
          three times as long for width dilations >= 32);
        - the convolution, the mel projection (accumulated into the convolution's output) and the gate are one
          autograd node (:class:`_ConvGate`); the convolution biases join the mel projection's;
        - the skip and residual projections accumulate in place into tensors of their own (no copy of the addend;
          an in-place op on a view would make autograd copy the gradient);
        - the output 1x1 convolution is linear after the skip sum, so it is folded into each layer's skip
          projection: the skip path is 2 channels wide instead of C.
        A ``context`` whose memory is already channels-last (a permuted (B, rows, W, context_channels) tensor, as
        :class:`WaveFlowLayer` passes it) is used without a copy.
        """
        C, L = self.channels, self.n_layers
        batch, _, rows, width = x.shape
        n = batch * rows * width
        self._check_context(context)
        h = torch.addmm(self.start.bias, x.reshape(n, 1), self.start.weight.reshape(1, C))  # (B rows W, C)
        w_end = self.end.weight.reshape(2, C)
        ctx = None
        if self.cond is not None:
            ctx = context.permute(0, 2, 3, 1).reshape(n, self.context_channels)  # (B rows W, M)
            w_cond = self.cond.weight.reshape(L, 2 * C, self.context_channels)
            b_cond = self.cond.bias.reshape(L, 2 * C)
        # every layer's skip bias, through the output conv, joins the output bias
        skip = (self.end.bias + sum(w_end @ b.out.bias[-C:] for b in self.blocks)).expand(n, 2).contiguous()
        for i, block in enumerate(self.blocks):
            bias = block.conv.bias if self.cond is None else block.conv.bias + b_cond[i]
            pad_w = block.dw * (block.k - 1) // 2
            # zeros above (causal) and pad_w each side along width: (B, pad_h + rows, W + 2 pad_w, C)
            padded = F.pad(h.view(batch, rows, width, C), (0, 0, pad_w, pad_w, block.pad_h, 0))
            y = _ConvGate.apply(  # (B rows W, C)
                padded.permute(0, 3, 1, 2), block.conv.weight, bias, ctx, None if ctx is None else w_cond[i],
                (block.dh, block.dw),
            )  # fmt: skip
            w_out = block.out.weight.reshape(-1, C)  # (2C, C), (C, C) for the last layer: [residual;] skip
            # in-place GEMMs are not autocast: their operands take the accumulator's dtype (no-ops in float32)
            skip.addmm_(y.to(skip.dtype), (w_end @ w_out[-C:]).t().to(skip.dtype))  # (B rows W, 2)
            if not block.last:  # h: (B rows W, C), a tensor of its own (an in-place op on a view makes autograd copy)
                h = h.addmm_(y.to(h.dtype), w_out[:C].t().to(h.dtype)).add_(block.out.bias[:C])
        return skip.view(batch, rows, width, 2).permute(0, 3, 1, 2)

    # ---- incremental computation: one row at a time, each layer's input rows cached ------------------------
    def start_rows(self, batch: int, width: int, like: Tensor) -> list[list[Tensor]]:
        """Empty row caches, one list per layer, starting with its ``pad_h`` zero rows (B, C, W) of padding."""
        zero = like.new_zeros(batch, self.channels, width)
        return [[zero] * b.pad_h for b in self.blocks]

    def step(self, x_row: Tensor, context_row: Tensor | None, caches: list[list[Tensor]]) -> Tensor:
        """Output row ``i`` (B, 2, 1, W) from input row ``i`` (B, 1, 1, W), ``i`` rows being cached before it.

        Each layer appends its input row to its cache and convolves the ``k`` rows its kernel sees; rows that no
        later step can reach are dropped. No in-place writes, so this path is differentiable (the generic flow suite
        takes the Jacobian of the inverse through it); :class:`RowStepper` is the fast one for synthesis."""
        h = self.start(x_row)
        skip = 0
        for block, cond, cache in zip(self.blocks, self._conds(context_row), caches):
            cache.append(h[:, :, 0])
            window = torch.stack(cache[-1 - block.pad_h :: block.dh], dim=2)  # rows i - (k-1) d, ..., i: (B, C, k, W)
            del cache[: -block.pad_h or len(cache)]
            res, s = block.step(window, cond)
            skip = skip + s
            if res is not None:
                h = h + res
        return self.end(skip)


class RowStepper:
    """The conditioner's row step for synthesis (no autograd): the same function as :meth:`WaveNet2D.step`, with
    the weights rearranged once per call of :meth:`WaveFlowLayer.inverse` and every buffer preallocated.

    - the output 1x1 convolution is linear after the skip sum, so it is folded into every layer's skip projection:
      a layer's skip GEMM has 2 output channels (its share of ``(log_s, t)``) instead of ``C``, and accumulates in
      place into the 2-channel sum, which starts at all the skip biases and the output bias together;
    - the convolution biases join the mel projection's bias (one add per layer less);
    - the residual projection accumulates in place into the next layer's row, which starts as ``h`` + its bias;
    - each layer keeps its input rows in a history (B, (k-1) d + rows, C, W), each row written once, below
      ``(k-1) d`` zero rows (the causal padding), so the rows a kernel sees are one slice: for height dilation 1 the
      window is a free view, and the 3x3 convolution is a 1-D convolution over ``k C`` stacked channels, computed
      as ``k`` accumulating GEMMs on shifted views (:func:`_conv_width`) into this row's mel projection; a residual
      add writes straight into the next layer's history (memory: ``(k-1) d + h - 1`` rows of (C, W) per layer, 17
      at the paper's h = 16: 0.36 GB per layer for a minute of audio in float32; a ring copied every row held 6);
    - the gate is two kernels (tanh in place, then GLU).
    Weights are read from the module at construction (never cached across calls, so it is never stale).

    ``impl``: ``"torch"`` (the GEMMs above), ``"triton"`` (each layer's row as one fused kernel,
    :mod:`apps.waveflow.row_triton`: the same arithmetic in one launch instead of about eight) or ``"auto"`` (Triton
    on a CUDA device when it is installed and the channels fit its tiles).
    """

    def __init__(self, net: WaveNet2D, batch: int, width: int, like: Tensor, rows: int, impl: str = "auto") -> None:
        C, L, k = net.channels, net.n_layers, net.blocks[0].k
        self.rows = rows  # the most step calls this stepper serves
        self.C = C
        self.fused = _use_triton_rows(impl, like.device, C, like.dtype, k)
        self.w_start = net.start.weight.reshape(C, 1)
        self.b_start = net.start.bias.reshape(C, 1)
        w_end = net.end.weight.reshape(2, C)
        skip_bias = net.end.bias.clone()  # (2,): the output bias plus every layer's skip bias through it
        bias = []
        self.blocks = []
        for b in net.blocks:
            w = b.conv.weight  # (2C, C, k, k) -> k matrices (2C, k C), one per kernel column: [r C + c] = row r, ch c
            w3 = [w[..., col].permute(0, 2, 1).reshape(2 * C, k * C).contiguous() for col in range(k)]
            wo = b.out.weight.reshape(-1, C)
            bo = b.out.bias
            if b.last:  # all skip
                w_res, b_res, w_skip = None, None, w_end @ wo
                skip_bias = skip_bias + w_end @ bo
            else:
                w_res, b_res, w_skip = wo[:C].contiguous(), bo[:C].reshape(C, 1), w_end @ wo[C:]
                skip_bias = skip_bias + w_end @ bo[C:]
            self.blocks.append((b, w3, w_res, b_res, w_skip.contiguous()))
            bias.append(b.conv.bias)
        self.skip_bias = skip_bias.reshape(1, 2, 1)
        bias = torch.cat(bias)  # (L 2C,)
        if net.cond is not None:
            self.w_cond = net.cond.weight.reshape(L * 2 * C, -1)
            self.b_cond = net.cond.bias + bias
        else:
            self.w_cond, self.b_cond = None, bias.reshape(1, L * 2 * C, 1)
        if self.fused:  # the kernel's operands: taps (k, 2C, k C), skip rows padded to 16, residual bias (C,)
            from apps.waveflow.row_triton import SKIP_ROWS, layer_row

            self.layer_row = layer_row  # looked up once, not in every row step

            self.fused_weights = []
            for _, w3, w_res, b_res, w_skip in self.blocks:
                skip16 = w_skip.new_zeros(SKIP_ROWS, C)
                skip16[:2] = w_skip
                res = (w_res, b_res.reshape(C).contiguous()) if w_res is not None else (None, None)
                self.fused_weights.append((torch.stack(w3).contiguous(), skip16, *res))
        # histories: (B, pad + rows, C, W) per layer; the first pad rows stay zero (the causal padding)
        self.history = [like.new_zeros(batch, b.pad_h + rows, C, width) for b in net.blocks]
        self.j = 0

    def step(self, x_row: Tensor, context_row: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log_s, t), each (B, W), of input row ``j`` (B, W) (``j`` = the number of earlier calls)."""
        C, j, n = self.C, self.j, len(self.blocks)
        if j >= self.rows:
            raise RuntimeError(f"RowStepper: built for {self.rows} rows, asked for row {j}")
        self.j += 1
        fresh = self.w_cond is not None  # else conds is the shared bias, broadcast: never written
        conds = _pointwise(self.w_cond, self.b_cond, context_row) if fresh else self.b_cond
        first = self.blocks[0][0]
        h = torch.addcmul(self.b_start, self.w_start, x_row[:, None], out=self.history[0][:, first.pad_h + j])
        skip = self.skip_bias.expand(x_row.shape[0], 2, x_row.shape[-1]).clone()  # (B, 2, W)
        if self.fused:
            for i, ((b, *_), (taps, skip16, w_res, b_res)) in enumerate(zip(self.blocks, self.fused_weights)):
                nxt = self.history[i + 1][:, self.blocks[i + 1][0].pad_h + j] if i + 1 < n else None
                cond = conds[:, i * 2 * C : (i + 1) * 2 * C]
                self.layer_row(self.history[i], j, b.dh, b.dw, cond, taps, skip16, skip, w_res, b_res, nxt)
            return skip[:, 0], skip[:, 1]
        for i, (b, w3, w_res, b_res, w_skip) in enumerate(self.blocks):
            window = self.history[i][:, j : j + b.pad_h + 1 : b.dh].flatten(1, 2)  # (B, k C, W), oldest row first
            # (B, 2C, W), mel included; a fresh mel projection (this row's own) takes the GEMMs in place
            a = _conv_width(w3, b.dw, window, conds[:, i * 2 * C : (i + 1) * 2 * C], in_place=fresh)
            a[:, :C].tanh_()
            gated = F.glu(a, dim=1)  # tanh(first half) * sigmoid(second half), (B, C, W)
            _gemm_into(skip, w_skip, gated)
            if i + 1 < n:
                nxt = self.blocks[i + 1][0]
                h = _gemm_into(torch.add(h, b_res, out=self.history[i + 1][:, nxt.pad_h + j]), w_res, gated)
        return skip[:, 0], skip[:, 1]


ROW_IMPLS = ("auto", "torch", "triton")  # how RowStepper computes a row: see its docstring


def _use_triton_rows(impl: str, device: torch.device, channels: int, dtype: torch.dtype, kernel: int) -> bool:
    """Whether a :class:`RowStepper` runs its layers as the fused Triton kernel (see its ``impl``). ``auto`` takes
    it on CUDA only after :func:`_triton_rows_self_check` passed for this device, dtype and size (else it warns once
    and keeps the torch rows: a kernel that fails to build or disagrees never gives audio)."""
    if impl not in ROW_IMPLS:
        raise ValueError(f"RowStepper: impl must be one of {', '.join(ROW_IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    from apps.waveflow import row_triton

    usable = row_triton.available(device) and row_triton.supports(channels)
    if impl == "triton":
        if not usable:
            raise RuntimeError(
                f"RowStepper impl='triton': needs Triton on a CUDA device (or TRITON_INTERPRET=1) and a power-of-two "
                f"channel count >= 16 (got {channels} channels on {device})"
            )
        return True
    if not (usable and device.type == "cuda"):
        return False
    problem = _triton_rows_self_check(str(device), dtype, channels, kernel)
    if problem:
        message = f"WaveFlow: the fused Triton row kernel is not used ({problem}); synthesis runs the torch rows"
        warnings.warn(message, stacklevel=3)
    return not problem


@functools.cache
def _triton_rows_self_check(device: str, dtype: torch.dtype, channels: int, kernel: int) -> str:
    """'' if the fused row kernel gives a small random conditioner's rows as the torch GEMMs do on ``device`` in
    ``dtype`` (height dilations 1 and 2, width dilations 1 and 2, 200 columns, 6 rows); else what went wrong."""
    gen = torch.Generator().manual_seed(0)
    net = WaveNet2D(channels, 2, 8, (1, 2), kernel)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p[0].numel(), 1)))
    net = fold_weight_norm(net).to(device=device, dtype=dtype)
    x = torch.randn(1, 6, 200, generator=gen).to(device=device, dtype=dtype)
    ctx = torch.randn(1, 6, 8, 200, generator=gen).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            outs = []
            for impl in ("torch", "triton"):
                stepper = RowStepper(net, 1, 200, x, rows=6, impl=impl)
                outs.append(torch.cat([torch.stack(stepper.step(x[:, r], ctx[:, r])) for r in range(6)]))
    except Exception as e:  # a kernel that does not compile or launch here
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    err = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max().clamp_min(1e-6)).item()
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    return "" if err <= tolerance else f"self-check: relative difference {err:.1e} from the torch rows"


def _conv_width(ws: list[Tensor], dilation: int, x: Tensor, init: Tensor, in_place: bool = False) -> Tensor:
    """``init`` + the 1-D convolution along width ("same" zero padding) of ``x`` (B, K, W) with the kernel columns
    ``ws`` (each (N, K)), as accumulating GEMMs on shifted views: no im2col copy, and the mel term is added by the
    first GEMM (about 1.5x faster than oneDNN's dilated convolution + an add on one core). ``in_place``: ``init``
    (B, N, W) is a scratch tensor the GEMMs accumulate into (no copy of it into a new output)."""
    k, width = len(ws), x.shape[-1]
    centre = k // 2
    if x.shape[0] == 1:
        x0 = x[0]
        if in_place:
            a = init[0].addmm_(ws[centre], x0)
        else:
            a = torch.addmm(init[0] if init.dim() == 3 else init, ws[centre], x0)
        for col, w in enumerate(ws):
            d = (col - centre) * dilation  # out[:, t] += w @ x[:, t + d]
            if col == centre or abs(d) >= width:
                continue
            if d < 0:
                a[:, -d:].addmm_(w, x0[:, : width + d])
            else:
                a[:, : width - d].addmm_(w, x0[:, d:])
        return a[None]
    batch = x.shape[0]
    if in_place:
        a = init.baddbmm_(ws[centre].expand(batch, -1, -1), x)
    else:
        a = torch.baddbmm(init, ws[centre].expand(batch, -1, -1), x)
    for col, w in enumerate(ws):
        d = (col - centre) * dilation
        if col == centre or abs(d) >= width:
            continue
        we = w.expand(batch, -1, -1)
        if d < 0:
            a[:, :, -d:].baddbmm_(we, x[:, :, : width + d])
        else:
            a[:, :, : width - d].baddbmm_(we, x[:, :, d:])
    return a


def _gemm_into(out: Tensor, w: Tensor, x: Tensor) -> Tensor:
    """``out += w @ x`` in place, batched: out (B, N, W), w (N, K), x (B, K, W); returns ``out``."""
    if x.shape[0] == 1:
        out[0].addmm_(w, x[0])
    else:
        out.baddbmm_(w.expand(x.shape[0], -1, -1), x)
    return out


def _pointwise(w: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """A 1x1 convolution as one GEMM with its bias: w (N, K), b (N,), x (B, K, W) -> (B, N, W)."""
    if x.shape[0] == 1:
        return torch.addmm(b[:, None], w, x[0])[None]
    return torch.baddbmm(b[:, None], w.expand(x.shape[0], -1, -1), x)


def _channels_last_rows(context: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` of a context (B, M, h, W) as (B, M, len(rows), W) in channels-last memory (a permuted
    contiguous (B, len(rows), W, M) tensor), the layout :meth:`WaveNet2D.forward` reads without a copy. One gather,
    which copies whole rows when ``context`` is channels-last already (:meth:`WaveFlow.log_prob` makes it so)."""
    return context.permute(0, 2, 3, 1)[:, rows].contiguous().permute(0, 3, 1, 2)


FIRST_ROW = ("copy", "transform")


class WaveFlowLayer(Flow):
    """One WaveFlow flow: affine autoregressive along height, in the row order ``order``.

    Shapes: ``x`` (B, h, W) (a squeezed waveform), ``context`` (B, context_channels, h, W) (the upsampled mel,
    squeezed the same way) or None. Both stay in the natural row order; the layer reads and writes them in
    ``order`` internally. Row ``order[k]`` is transformed with a scale and shift that depend on the rows
    ``order[:k]`` and on context row ``order[k]`` only.

    ``first_row="copy"`` (default, both reference implementations): row ``order[0]`` passes through unchanged and
    the conditioner sees rows ``order[:h-1]`` to transform rows ``order[1:]``, so the inverse takes ``h - 1`` row
    steps. ``"transform"`` (the paper's equations taken literally): row ``order[0]`` is transformed too, with a scale
    and shift from the context alone (the conditioner's input shifted down by one zero row); ``h`` row steps.

    ``forward`` is one parallel pass; ``inverse`` is exact and fast (one row of every convolution per step, conv
    states cached: :class:`RowStepper` without autograd, :meth:`WaveNet2D.step` with it); ``inverse_naive`` is the
    O(h^2) reference.
    """

    def __init__(
        self,
        height: int,
        context_channels: int = 80,
        channels: int = 64,
        n_layers: int = 8,
        dilations_h: Sequence[int] | None = None,
        order: Sequence[int] | None = None,
        kernel: int = 3,
        first_row: str = "copy",
    ) -> None:
        super().__init__()
        if first_row not in FIRST_ROW:
            raise ValueError(f"WaveFlowLayer: first_row={first_row!r}: choose {' or '.join(FIRST_ROW)}")
        self.height, self.first_row = height, first_row
        self.first = 1 if first_row == "copy" else 0  # rows passed through unchanged
        order = list(range(height)) if order is None else [int(o) for o in order]
        if sorted(order) != list(range(height)):
            raise ValueError(f"WaveFlowLayer: order must be a permutation of 0..{height - 1}, got {order}")
        dilations_h = list(dilations_h) if dilations_h is not None else default_height_dilations(height, n_layers)
        self.net = WaveNet2D(channels, n_layers, context_channels, dilations_h, kernel)
        self.register_buffer("order", torch.as_tensor(order), persistent=False)
        self.register_buffer("inverse_order", torch.argsort(self.order), persistent=False)
        self.order_list = order
        self._natural = order == list(range(height))
        self.row_impl = "auto"  # RowStepper's impl for the fast inverse: auto, torch or triton

    def _permute(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if x.dim() != 3 or x.shape[1] != self.height:
            raise ValueError(f"WaveFlowLayer: expected x of shape (B, {self.height}, W), got {tuple(x.shape)}")
        if self._natural:
            return x, context
        return x[:, self.order], (None if context is None else context[:, :, self.order])

    def _unpermute(self, x: Tensor) -> Tensor:
        return x if self._natural else x[:, self.inverse_order]

    def _params(self, xp: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log_s, t) of rows ``first .. h-1`` (permuted order), each (B, h - first, W), from the permuted input
        ``xp`` and the context in its natural row order."""
        if self.first:  # rows 0..h-2 predict rows 1..h-1 (the references' layout)
            inp = xp[:, None, :-1]
        else:  # a zero row above: row i sees rows < i
            inp = F.pad(xp, (0, 0, 1, 0))[:, None, :-1]
        ctx = None if context is None else _channels_last_rows(context, self.order[self.first :])
        log_s, t = self.net(inp, ctx).unbind(1)
        return log_s, t

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xp, _ = self._permute(x, None)
        log_s, t = self._params(xp, context)
        z, ld = affine_forward(xp[:, self.first :], t, log_s)  # unbounded log-scale (scale "none"), as the paper
        if self.first:
            z = torch.cat([xp[:, : self.first], z], dim=1)
        return self._unpermute(z), ld.flatten(1).sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Fast exact inverse: ``h - first`` steps, each computing one row of every layer from the cached rows."""
        if not torch.is_grad_enabled():
            return self._inverse_stepper(z, context)
        zp, cp = self._permute(z, context)
        batch, height, width = zp.shape
        caches = self.net.start_rows(batch, width, zp)
        rows, logdet = [zp[:, : self.first]], zp.new_zeros(batch)
        prev = zp[:, None, :1] if self.first else zp.new_zeros(batch, 1, 1, width)
        for i in range(self.first, height):
            params = self.net.step(prev, None if cp is None else cp[:, :, i : i + 1], caches)
            log_s, t = params[:, 0], params[:, 1]  # (B, 1, W)
            x_row, ld = affine_inverse(zp[:, i : i + 1], t, log_s)
            rows.append(x_row)
            logdet = logdet + ld.flatten(1).sum(1)
            prev = x_row[:, None]
        return self._unpermute(torch.cat(rows, dim=1)), logdet

    def _inverse_stepper(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` without autograd: rows read and written in place through ``order``, no permuted copies."""
        if z.dim() != 3 or z.shape[1] != self.height:
            raise ValueError(f"WaveFlowLayer: expected x of shape (B, {self.height}, W), got {tuple(z.shape)}")
        batch, height, width = z.shape
        stepper = RowStepper(self.net, batch, width, z, rows=height - self.first, impl=self.row_impl)
        ctx = None if context is None else context.transpose(1, 2).contiguous()  # (B, h, C, W): row r = ctx[:, r]
        x = torch.empty_like(z)
        neg_log_s = z.new_zeros(batch)
        order = self.order_list
        prev = z.new_zeros(batch, width)
        if self.first:
            x[:, order[0]] = prev = z[:, order[0]]
        for i in range(self.first, height):
            row = order[i]
            log_s, t = stepper.step(prev, None if ctx is None else ctx[:, row])
            prev = x[:, row]
            torch.sub(z[:, row], t, out=prev)
            prev.mul_(torch.exp(-log_s))
            neg_log_s -= log_s.sum(1)
        return x, neg_log_s

    def inverse_naive(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reference inverse: ``h - first`` full passes of the conditioner, row ``i`` solved after pass ``i``."""
        zp, _ = self._permute(z, None)
        xp = torch.cat([zp[:, : self.first], torch.zeros_like(zp[:, self.first :])], dim=1)
        logdet = zp.new_zeros(zp.shape[0])
        for i in range(self.first, self.height):
            log_s, t = self._params(xp, context)
            k = i - self.first
            row, ld = affine_inverse(zp[:, i], t[:, k], log_s[:, k])
            xp = torch.cat([xp[:, :i], row[:, None], xp[:, i + 1 :]], dim=1)
            logdet = logdet + ld.sum(1)
        return self._unpermute(xp), logdet


def upsample_factors_for(hop_length: int) -> list[int]:
    """Two even factors of the hop, as close to its square root as they come (256 -> [16, 16], 128 -> [16, 8],
    200 -> [20, 10]); one factor when no even pair exists (an even hop); an odd hop cannot be upsampled here."""
    if hop_length < 2 or hop_length % 2:
        raise ValueError(f"data.hop_length={hop_length}: the mel upsampler needs an even hop length")
    for f in range(math.isqrt(hop_length), hop_length):
        if hop_length % f == 0 and f % 2 == 0 and (hop_length // f) % 2 == 0 and f >= hop_length // f:
            return [f, hop_length // f]
    return [hop_length]


class MelUpsampler(nn.Module):
    """Mel frames to sample rate: weight-normalised 2-D transposed convs over (mel band, time), one per factor,
    leaky ReLU 0.4 (as both references).

    (B, n_mels, F) -> (B, n_mels, F * prod(factors)); kernel (3, 2 f), stride (1, f), padding (1, f / 2) makes
    each layer exactly ``f`` times longer.
    """

    def __init__(self, factors: Sequence[int] = (16, 16)) -> None:
        super().__init__()
        for f in factors:
            if f % 2:
                raise ValueError(f"MelUpsampler: factors must be even, got {list(factors)}")
        self.factors = [int(f) for f in factors]
        self.hop = math.prod(self.factors)
        self.layers = nn.ModuleList(
            weight_norm(nn.ConvTranspose2d(1, 1, (3, 2 * f), stride=(1, f), padding=(1, f // 2))) for f in self.factors
        )

    def forward(self, mel: Tensor) -> Tensor:
        x = mel[:, None]  # (B, 1, n_mels, F)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.4)
        return x[:, 0]


class LatentNormal(nn.Module):
    """N(0, I) over the latent matrix (B, h, W), whatever W: the length comes with the context at sampling."""

    def __init__(self, height: int) -> None:
        super().__init__()
        self.height = height

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return -0.5 * z.flatten(1).square().sum(1) - 0.5 * _LOG_2PI * z[0].numel()

    def sample(self, n: int | None = None, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        if context is None:
            raise ValueError("LatentNormal.sample needs the squeezed context (B, C, h, W) to know the length")
        b, _, h, w = context.shape
        return temperature * torch.randn(b, h, w, device=context.device, dtype=context.dtype)


class WaveFlow(nn.Module):
    """The WaveFlow vocoder: p(audio | mel) = N(f(audio; mel)) |det df/d audio|, ``f`` a stack of flows.

    ``log_prob(audio (B, T), mel (B, n_mels, F))`` in nats per clip, with ``F * hop >= T`` and ``T`` a
    multiple of ``height``; ``synthesize(mel)`` returns (B, F * hop) audio.
    """

    def __init__(
        self,
        height: int = 16,
        n_flows: int = 8,
        n_layers: int = 8,
        channels: int = 64,
        n_mels: int = 80,
        hop_length: int | None = 256,
        upsample_factors: Sequence[int] | None = None,
        permutation: str = "paper",
        dilations_h: Sequence[int] | None = None,
        kernel: int = 3,
        first_row: str = "copy",
    ) -> None:
        super().__init__()
        if not 2 <= height <= 64:
            raise ValueError(f"WaveFlow: height must be in 2..64 (the paper uses 8..64), got {height}")
        if upsample_factors is None:
            if hop_length is None:
                raise ValueError("WaveFlow: give hop_length (the mel's hop, data.hop_length) or upsample_factors")
            upsample_factors = upsample_factors_for(hop_length)
        elif hop_length is not None and math.prod(upsample_factors) != hop_length:
            raise ValueError(
                f"WaveFlow: model.upsample_factors={list(upsample_factors)} upsample the mel by "
                f"{math.prod(upsample_factors)}, but data.hop_length={hop_length}: the conditioning would be "
                "misaligned with the audio (set model.upsample_factors=null to derive them from the hop)"
            )
        self.height, self.n_mels, self.first_row = height, n_mels, first_row
        self.upsampler = MelUpsampler(upsample_factors)
        self.hop = self.upsampler.hop
        orders = height_orders(height, n_flows, permutation)
        layers = [
            WaveFlowLayer(height, n_mels, channels, n_layers, dilations_h, order, kernel, first_row) for order in orders
        ]
        self.flow = FlowModel(Sequential(HeightSqueeze(height), *layers), LatentNormal(height))

    def check_hop(self, hop_length: int) -> None:
        """Refuse a mel whose hop is not the model's upsampling product (both numbers in the message)."""
        if hop_length != self.hop:
            raise ValueError(
                f"WaveFlow: the model upsamples the mel by {self.hop} (factors {self.upsampler.factors}), but the "
                f"mel's hop length is {hop_length}: the conditioning would be misaligned with the audio"
            )

    def fold_weight_norm(self) -> WaveFlow:
        """Remove weight normalisation for synthesis (same function, :func:`fold_weight_norm`); returns self."""
        return fold_weight_norm(self)

    @property
    def layers(self) -> list[WaveFlowLayer]:
        return list(self.flow.transform.flows)[1:]

    def set_row_impl(self, impl: str) -> WaveFlow:
        """How synthesis computes a conditioner row (:class:`RowStepper`'s ``impl``: ``auto``, ``torch`` or
        ``triton``) in every flow; returns self."""
        if impl not in ROW_IMPLS:
            raise ValueError(f"WaveFlow: row impl must be one of {', '.join(ROW_IMPLS)}, got {impl!r}")
        for layer in self.layers:
            layer.row_impl = impl
        return self

    def condition(self, mel: Tensor, length: int) -> Tensor:
        """Upsampled, cropped and squeezed conditioner: (B, n_mels, F) -> (B, n_mels, h, length / h)."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"WaveFlow: expected a mel of shape (B, {self.n_mels}, frames), got {tuple(mel.shape)}")
        if mel.shape[2] * self.hop < length:
            raise ValueError(f"WaveFlow: {mel.shape[2]} mel frames cover {mel.shape[2] * self.hop} < {length} samples")
        return squeeze(self.upsampler(mel)[..., :length], self.height)

    def log_prob(self, audio: Tensor, mel: Tensor) -> Tensor:
        """log p(audio | mel) in nats per clip: (B,)."""
        context = self.condition(mel, audio.shape[-1])  # (B, n_mels, h, W)
        context = context.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last: see WaveNet2D.forward
        return self.flow.log_prob(audio, context)

    def synthesize(
        self, mel: Tensor, sigma: float = 1.0, length: int | None = None, fast: bool = True, noise: Tensor | None = None
    ) -> Tensor:
        """Audio (B, length) from a mel (B, n_mels, F); ``length`` defaults to ``F * hop`` (a multiple of h).

        ``noise`` (B, length) replaces the Gaussian draw (``sigma`` still scales it); ``fast=False`` uses the
        naive O(h^2) inverse (same result, for tests)."""
        length = mel.shape[2] * self.hop if length is None else length
        full = -(-length // self.height) * self.height
        c = self.condition(mel, full)
        z = squeeze(noise, self.height) if noise is not None else torch.randn_like(c[:, 0])
        z = sigma * z.to(c.dtype)
        for layer in reversed(self.layers):
            z = (layer.inverse if fast else layer.inverse_naive)(z, c)[0]
        return unsqueeze(z)[:, :length]
