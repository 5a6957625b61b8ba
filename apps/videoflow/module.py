"""The VideoFlow FlowModule: NLL of the target frames (given the context frames), bits per pixel, predicted videos."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from apps.videoflow.media import write_gif, write_strip
from core.training import FlowModule
from core.training.media import log_image, log_video

__all__ = ["VideoFlowModule", "linear_warmup"]


class VideoFlowModule(FlowModule):
    """Loss: ``-log P(x_K..x_T-1 | x_0..x_K-1)`` in nats per clip (``nll``); ``bpd`` is bits per target sub-pixel
    (frames after the model's ``context_frames``, times C H W), the paper's bits per pixel.

    After validation (rank zero) the first ``num_sample_videos`` validation clips are continued from their context
    frames at ``sample_temperature``; a GIF and a PNG strip (truth above samples) go to ``media/`` and W&B.
    """

    def __init__(self, model: nn.Module, num_sample_videos: int = 2, sample_temperature: float = 0.7, **kwargs) -> None:
        """``kwargs``: :class:`core.training.FlowModule`'s arguments (optimizer, scheduler, ema_decay, ...)."""
        super().__init__(model, **kwargs)
        self.num_sample_videos, self.sample_temperature = num_sample_videos, sample_temperature

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        return batch, None

    def num_dims(self, x: Tensor) -> int:
        k = self.model.context_frames
        if x.shape[1] <= k:
            raise ValueError(f"clips of {x.shape[1]} frames leave no target after context_frames={k}")
        return (x.shape[1] - k) * x[0, 0].numel()

    @torch.no_grad()
    def log_samples(self) -> None:
        val = self.trainer.datamodule.val_set
        n = min(self.num_sample_videos, len(val))
        if not n:
            return
        model, k = self.eval_model, self.model.context_frames
        truth = torch.stack([val[i] for i in range(n)]).to(self.device)
        pred = model.predict(truth[:, :k], truth.shape[1] - k, self.sample_temperature)
        video = torch.cat([truth[:, :k], pred], dim=1).cpu().numpy()
        media = self.output_dir / "media"
        tag = f"epoch{self.current_epoch:03d}"
        scale = max(1, 128 // truth.shape[-1])
        rows = [r for i in range(n) for r in (truth[i].cpu().numpy(), video[i])]
        strip = write_strip(media / f"predictions_{tag}.png", rows, scale=scale)
        gif = write_gif(media / f"prediction_{tag}.gif", video[0], scale=scale)
        log_image(self.trainer, "samples/predictions", strip, caption="rows: truth, context + sampled future")
        log_video(self.trainer, "samples/video", gif)


class linear_warmup:  # noqa: N801  (a picklable callable named like the schedule it is)
    """LR factor ``min(1, (step + 1) / steps)``: linear warm-up over ``steps`` optimizer steps, then constant."""

    def __init__(self, steps: int) -> None:
        self.steps = max(int(steps), 1)

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)
