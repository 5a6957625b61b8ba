"""WaveFlow synthesis as one CUDA graph: a GPU run of the row-by-row inverse is launch-bound (about ten small kernels
per conditioner layer per row step, ``(h - 1) x n_flows x n_layers`` steps), so the whole synthesis of one shape is
captured once and replayed: one launch per utterance batch.

The captured call is :meth:`WaveFlow.synthesize` itself with explicit noise, on static input buffers; the noise is
drawn outside the graph into its buffer (or given), so a replay is the same function as the eager call. Without a
GPU (``capture=False``) the same static-buffer code runs eagerly, which is what the CPU tests check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from apps.waveflow.model import WaveFlow

__all__ = ["GraphSynthesizer"]


class GraphSynthesizer:
    """Synthesis of mels of one shape ``(batch, n_mels, frames)`` from a captured CUDA graph.

    Arguments:
        model: a WaveFlow prepared for inference (weight norm folded, eval mode, on its device and dtype).
        batch, frames: the one input shape the graph serves (another shape is refused: capture a second one).
        sigma: the temperature of the noise.
        warmup: eager calls on a side stream before capture (allocator and cuDNN plans settle).
        capture: capture a graph (default: when the model is on a CUDA device); False runs the same static-buffer
            code eagerly.
    """

    def __init__(
        self, model: WaveFlow, batch: int, frames: int, sigma: float = 1.0, warmup: int = 2, capture: bool | None = None
    ) -> None:
        param = next(model.parameters())
        self.model, self.sigma, self.device, self.dtype = model, sigma, param.device, param.dtype
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"GraphSynthesizer: capture=True needs the model on a CUDA device, it is on {self.device}")
        self.shape = (batch, model.n_mels, frames)
        self.mel = torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        self.noise = torch.zeros(batch, frames * model.hop, device=self.device, dtype=self.dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        if self.capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(self.graph):
                self.out = self._run()

    def _run(self) -> Tensor:
        return self.model.synthesize(self.mel, sigma=self.sigma, noise=self.noise)

    def __call__(self, mel: Tensor, noise: Tensor | None = None) -> Tensor:
        """Audio (batch, frames * hop) for ``mel`` of the captured shape; ``noise`` (batch, frames * hop) is drawn
        from N(0, 1) when not given (then scaled by ``sigma``, as in :meth:`WaveFlow.synthesize`)."""
        if tuple(mel.shape) != self.shape:
            raise ValueError(f"GraphSynthesizer: captured for mels of shape {self.shape}, got {tuple(mel.shape)}")
        self.mel.copy_(mel)
        if noise is None:
            self.noise.normal_()
        else:
            if noise.shape != self.noise.shape:
                raise ValueError(
                    f"GraphSynthesizer: noise of shape {tuple(self.noise.shape)}, got {tuple(noise.shape)}"
                )
            self.noise.copy_(noise)
        if self.graph is None:
            with torch.inference_mode():
                return self._run().clone()
        self.graph.replay()
        return self.out.clone()
