"""``FlowModule``: the one LightningModule every app subclasses.

Loss = negative log-likelihood in nats per sample (+ any terms an app adds in :meth:`loss_terms`), bits per
dimension logged beside it, optimizer and scheduler from Hydra partials, optional EMA of the weights, a NaN guard,
and a sample-logging hook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from core.flows.continuous import regularization_loss
from core.metrics import nats_to_bits_per_dim

__all__ = ["FlowModule", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step, the term and the rescue checkpoint."""


class FlowModule(pl.LightningModule):
    """Maximum-likelihood training of ``model`` (a :class:`core.distributions.FlowModel` or anything with
    ``log_prob(x, context)``).

    Arguments:
        model: the density model.
        optimizer: partial ``torch.optim`` constructor taking the parameters (Hydra ``_partial_: true``).
        scheduler: optional partial LR scheduler taking the optimizer; stepped every ``scheduler_interval``.
        ema_decay: keep an exponential moving average of the weights (used for validation and sampling).
        sample_every_n_epochs: call :meth:`log_samples` on rank zero after validation every n epochs (0: never).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        ema_decay: float | None = None,
        sample_every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.sample_every_n_epochs = sample_every_n_epochs
        self.ema = None
        if ema_decay:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self.run_config: dict | None = None  # the resolved config, stored in every checkpoint
        self._eval_seen = 0  # evaluation samples this rank has seen in the current epoch (DDP padding)

    # ---- what apps override -------------------------------------------------------------------------------
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(x, context) from a batch: a tensor, an (x, context) pair, or a dict with ``x`` and ``context``."""
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, dict):
            return batch["x"], batch.get("context")
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        raise TypeError(f"cannot unpack a batch of type {type(batch).__name__}; override unpack_batch")

    def num_dims(self, x: Tensor) -> int:
        """Dimensions per sample for bits-per-dimension."""
        return x[0].numel()

    def loss_terms(self, batch: Any, model: nn.Module) -> dict[str, Tensor]:
        """Scalar loss terms (already weighted) that add up to the loss; ``nll`` is the mean NLL in nats."""
        x, context = self.unpack_batch(batch)
        terms = {"nll": -model.log_prob(x, context).mean()}
        reg = regularization_loss(model)
        if reg is not None:
            terms["cnf_reg"] = reg
        return terms

    def extra_metrics(self, batch: Any, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Values logged beside the loss terms but not added to the loss (e.g. bits per point)."""
        return {}

    def log_samples(self) -> None:
        """Called on rank zero after validation every ``sample_every_n_epochs``: write/log media here."""

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample with: the EMA copy if there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) if self._trainer is not None else Path(".")

    # ---- Lightning hooks ----------------------------------------------------------------------------------
    def _batch_size(self, batch: Any) -> int:
        return self.unpack_batch(batch)[0].shape[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch, self.model)
        self._guard_finite(terms)
        loss = torch.stack(list(terms.values())).sum()
        bs = self._batch_size(batch)
        x, _ = self.unpack_batch(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/bpd", nats_to_bits_per_dim(terms["nll"].detach(), self.num_dims(x)), batch_size=bs)
        for k, v in self.extra_metrics(batch, terms).items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: Any, stage: str) -> None:
        """Log the loss terms as exact means over the evaluation set: every sample counted once, also under DDP
        (where Lightning's sampler pads each rank with repeated samples) and whatever the batch sizes."""
        full = self._batch_size(batch)
        n_real = self._real_samples(full)
        if 0 < n_real < full:
            batch = self.slice_batch(batch, n_real)
        terms = self.loss_terms(batch, self.eval_model)
        x, _ = self.unpack_batch(batch)
        keys = terms if stage == "val" else {"nll": terms["nll"]}
        for k, v in keys.items():
            self.log(f"{stage}/{k}", v, sync_dist=True, batch_size=n_real, prog_bar=(stage == "val" and k == "nll"))
        bpd = nats_to_bits_per_dim(terms["nll"], self.num_dims(x))
        self.log(f"{stage}/bpd", bpd, sync_dist=True, batch_size=n_real)
        for k, v in self.extra_metrics(batch, terms).items():
            self.log(f"{stage}/{k}", v, sync_dist=True, batch_size=n_real)

    def slice_batch(self, batch: Any, n: int) -> Any:
        """The first ``n`` samples of ``batch`` (tensors, and tuples / lists / dicts of batch-first tensors); apps with
        other batch structures override this."""
        size = self._batch_size(batch)

        def cut(v: Any) -> Any:
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size:
                return v[:n]
            if isinstance(v, dict):
                return {k: cut(u) for k, u in v.items()}
            if isinstance(v, (tuple, list)):
                return type(v)(cut(u) for u in v)
            return v

        return cut(batch)

    def _eval_sampler(self) -> DistributedSampler | None:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        return sampler if isinstance(sampler, DistributedSampler) and not sampler.drop_last else None

    def _real_samples(self, batch_size: int) -> int:
        """How many of this rank's next ``batch_size`` evaluation samples are real, not the sampler's padding.

        A ``DistributedSampler(shuffle=False)`` gives rank ``r`` the global positions ``r, r + W, r + 2W, ...`` of the
        index list padded (at its end) from N to a multiple of W; positions >= N are repeats."""
        sampler = self._eval_sampler()
        if sampler is None:
            return batch_size
        seen = self._eval_seen
        self._eval_seen += batch_size
        n, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
        return sum(1 for j in range(seen, seen + batch_size) if j * world + rank < n)

    def on_validation_epoch_start(self) -> None:
        self._eval_seen = 0

    def on_test_epoch_start(self) -> None:
        self._eval_seen = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def on_validation_epoch_end(self) -> None:
        n = self.sample_every_n_epochs
        if n and (self.current_epoch + 1) % n == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            with torch.no_grad():
                self.log_samples()

    def trainable_parameters(self) -> list[nn.Parameter]:
        ema_ids = {id(p) for p in self.ema.parameters()} if self.ema is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in ema_ids]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["flowsuite_config"] = self.run_config

    # ---- NaN guard ----------------------------------------------------------------------------------------
    def _guard_finite(self, terms: dict[str, Tensor]) -> None:
        bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v.detach()).all()}
        if self._trainer is None:
            if bad:
                raise NonFiniteLossError(f"non-finite loss term(s) {bad}")
            return
        # every rank must take the same decision, or the checkpoint save below would deadlock under DDP
        stop = self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False)
        if not stop:
            return
        path = Path(self.trainer.default_root_dir) / "checkpoints" / f"nan-guard-step{self.global_step}.ckpt"
        self.trainer.save_checkpoint(path)
        where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
        raise NonFiniteLossError(
            f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}): {where}. "
            f"The last good weights are saved in {path}; resume with ckpt_path={path} after lowering the "
            f"learning rate or enabling gradient clipping (trainer.gradient_clip_val=1.0)."
        )
