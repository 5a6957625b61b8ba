"""The PointFlow FlowModule: the negative ELBO as the loss, bits per point, and shape renders after validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from apps.pointflow.io import write_ply
from apps.pointflow.plots import render_clouds
from core.flows.continuous import regularization_loss
from core.metrics import nats_to_bits_per_dim
from core.training import FlowModule
from core.training.media import log_image, log_point_cloud

__all__ = ["PointFlowModule"]


class PointFlowModule(FlowModule):
    """Loss = recon_weight * E[-log p(X|z)] + prior_weight * E[-log p(z)] - entropy_weight * H[q(z|X)] (per shape).

    ``nll`` is the reconstruction term (nats per shape), so ``bpd`` is bits per coordinate; ``bits_per_point`` is
    logged beside it. The dataset's normalisation (global mean and std) is stored in buffers at the start of training,
    so that samples drawn from a checkpoint can be returned in the data's own units. Renders after validation
    draw as many points per shape as the data's evaluation clouds (``data.eval_points``).

    The auto-encoder of the paper (``experiment=ae``) is ``prior_weight=0, entropy_weight=0`` with a deterministic
    encoder and no latent flow: the loss is then the reconstruction term alone. Every other argument (optimizer,
    scheduler, EMA, sample interval) goes to :class:`core.training.FlowModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        recon_weight: float = 1.0,
        prior_weight: float = 1.0,
        entropy_weight: float = 1.0,
        num_sample_shapes: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.weights = dict(recon=recon_weight, prior=prior_weight, entropy=entropy_weight)
        self.num_sample_shapes = num_sample_shapes
        self.register_buffer("data_mean", torch.zeros(1, 3))
        self.register_buffer("data_std", torch.ones(1, 3))

    def num_dims(self, x: Tensor) -> int:
        return x.shape[1] * x.shape[2]

    def loss_terms(self, batch: Any, model: nn.Module) -> dict[str, Tensor]:
        t = model.elbo_terms(batch["x"])
        terms = {
            "nll": self.weights["recon"] * t["recon"].mean(),
            "prior": self.weights["prior"] * t["prior"].mean(),
            "neg_entropy": -self.weights["entropy"] * t["entropy"].mean(),
        }
        reg = regularization_loss(model)
        if reg is not None:
            terms["cnf_reg"] = reg
        return terms

    def extra_metrics(self, batch: Any, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        n = batch["x"].shape[1]
        recon = terms["nll"].detach() / self.weights["recon"] if self.weights["recon"] else terms["nll"].detach()
        return {
            "bits_per_point": nats_to_bits_per_dim(recon, n),
            "prior_nats_per_dim": terms["prior"].detach() / max(self.weights["prior"], 1e-12) / self.model.zdim,
        }

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        stats = getattr(getattr(dm, "train_set", None), "stats", None)
        if stats is not None and stats.mode in ("global", "axis"):
            self.data_mean.copy_(torch.as_tensor(np.asarray(stats.mean), dtype=torch.float32).reshape(1, 3))
            self.data_std.copy_(torch.as_tensor(np.asarray(stats.std), dtype=torch.float32).reshape(1, -1).expand(1, 3))

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised points (..., 3) back to the data's units (global/axis normalisation; identity otherwise)."""
        return x * self.data_std + self.data_mean

    @torch.no_grad()
    def log_samples(self) -> None:
        model = self.eval_model
        clouds, titles = [], []
        points = self.trainer.datamodule.eval_points
        val = self.trainer.datamodule.val_set
        k = min(self.num_sample_shapes, len(val))
        if k:
            x = torch.stack([torch.as_tensor(val[i]["x"]) for i in range(k)]).to(self.device)
            recon = model.reconstruct(x, points)
            clouds += [c.cpu().numpy() for c in x] + [c.cpu().numpy() for c in recon]
            titles += [f"val {i}" for i in range(k)] + [f"reconstruction {i}" for i in range(k)]
        if getattr(model, "latent", None) is not None:
            _, gen = model.sample(self.num_sample_shapes, points)
            clouds += [c.cpu().numpy() for c in gen]
            titles += [f"sample {i}" for i in range(len(gen))]
            log_point_cloud(self.trainer, "samples/point_cloud", gen[0].cpu().numpy())
            write_ply(self.output_dir / "media" / f"sample_epoch{self.current_epoch:03d}.ply", gen[0].cpu().numpy())
        if clouds:
            path = render_clouds(
                clouds, self.output_dir / "media" / f"shapes_epoch{self.current_epoch:03d}.png", titles
            )
            log_image(self.trainer, "samples/shapes", path)


class linear_decay:  # noqa: N801  (a picklable callable named like the schedule it is)
    """PointFlow's "linear" LR schedule: factor 1 for the first half of the epochs, then linearly down to 0."""

    def __init__(self, total_epochs: int) -> None:
        self.total = max(int(total_epochs), 1)

    def __call__(self, epoch: int) -> float:
        half = self.total / 2
        return 1.0 if epoch < half else max(0.0, 1.0 - (epoch - half) / half)
