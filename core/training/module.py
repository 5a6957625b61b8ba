"""``FlowModule``: the one LightningModule every app subclasses.

Loss = negative log-likelihood in nats per sample (+ any terms an app adds in :meth:`loss_terms`), bits per
dimension logged beside it, optimizer and scheduler from Hydra partials, optional EMA of the weights, a NaN guard,
and a sample-logging hook.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler

from core.flows.continuous import regularization_loss
from core.metrics import nats_to_bits_per_dim

__all__ = ["FlowModule", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term, a gradient or (after an optimizer step) a weight became NaN or infinite; the message names the
    step, the term or parameter, and the rescue checkpoint (which holds only finite tensors) if one was written."""


def _ema_update(decay: float, ema: list[Tensor], current: list[Tensor], _n_averaged: Tensor) -> None:
    """One EMA step for one group of tensors (``AveragedModel`` groups parameters and buffers by device and dtype).

    Floating-point tensors move towards the model's by ``1 - decay`` (an exact no-op when they are equal);
    integer and bool buffers (permutations, generation orders, flags) are copied exactly: averaging them in float
    and truncating back corrupts them (a ``long`` 3 becomes 2 at decay 0.9995).
    """
    with torch.no_grad():
        if ema[0].is_floating_point() or ema[0].is_complex():
            torch._foreach_lerp_(ema, current, 1.0 - decay)
        else:
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)


def _non_finite(named: list[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one device sync for the whole list)."""
    if not named:
        return []
    flags = [torch.isfinite(t.detach()).all() for _, t in named]
    dev = flags[0].device
    ok = torch.stack([f.to(dev) for f in flags])
    if bool(ok.all()):
        return []
    return [name for (name, _), good in zip(named, ok.tolist(), strict=True) if not good]


class FlowModule(pl.LightningModule):
    """Maximum-likelihood training of ``model`` (a :class:`core.distributions.FlowModel` or anything with
    ``log_prob(x, context)``).

    Arguments:
        model: the density model.
        optimizer: partial ``torch.optim`` constructor taking the parameters (Hydra ``_partial_: true``).
        scheduler: optional partial LR scheduler taking the optimizer; stepped every ``scheduler_interval``.
        ema_decay: keep an exponential moving average of the weights (used for validation and sampling), updated
            once per optimizer step; floating-point parameters and buffers are averaged, integer and bool buffers
            copied exactly.
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
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
            avg = functools.partial(_ema_update, float(ema_decay))
            self.ema = AveragedModel(model, multi_avg_fn=avg, use_buffers=True)
            self.ema.requires_grad_(False)
        self._step_pending = False  # an optimizer step ran whose weights are not yet checked nor averaged
        self.run_config: dict | None = None  # the resolved config, stored in every checkpoint
        self._eval_seen = 0  # evaluation samples this rank has seen in the current epoch (DDP padding)
        self._eval_sums: dict[str, Tensor] = {}  # per-term sums over this rank's real evaluation samples
        self._eval_count = 0

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
        """Accumulate the loss terms as exact sums over the evaluation set: every sample counted once, also under
        DDP (where Lightning's sampler pads each rank with repeated samples), in float64, whatever the batch sizes;
        :meth:`_log_evaluation` reduces them over the ranks at the end of the epoch."""
        full = self._batch_size(batch)
        n_real = self._real_samples(full)
        if 0 < n_real < full:
            batch = self.slice_batch(batch, n_real)
        terms = self.loss_terms(batch, self.eval_model)
        x, _ = self.unpack_batch(batch)
        values = dict(terms) if stage == "val" else {"nll": terms["nll"]}
        values["bpd"] = nats_to_bits_per_dim(terms["nll"], self.num_dims(x))
        values.update(self.extra_metrics(batch, terms))
        for k, v in values.items():
            v = torch.as_tensor(v).detach().to(self.device, torch.float64).mean()
            total = v * n_real if n_real else torch.zeros((), dtype=torch.float64, device=self.device)
            self._eval_sums[k] = self._eval_sums.get(k, 0.0) + total
        self._eval_count += n_real

    def _log_evaluation(self, stage: str) -> None:
        """Log ``stage/<term>`` = (sum over every rank's samples) / (their number): one all-reduce in float64.
        (Lightning's ``sync_dist`` mean divides an integer sample count by the world size and truncates it.)"""
        keys = sorted(self._eval_sums)
        if not keys:
            return
        count = torch.tensor([float(self._eval_count)], dtype=torch.float64, device=self.device)
        totals = torch.cat([torch.stack([torch.as_tensor(self._eval_sums[k]) for k in keys]), count])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        for k, total in zip(keys, totals[:-1]):
            mean = (total / totals[-1]).float()
            self.log(f"{stage}/{k}", mean, prog_bar=(stage == "val" and k == "nll"), rank_zero_only=False)
        self._eval_sums, self._eval_count = {}, 0

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
        self._eval_seen, self._eval_sums, self._eval_count = 0, {}, 0

    def on_test_epoch_start(self) -> None:
        self._eval_seen, self._eval_sums, self._eval_count = 0, {}, 0

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # ---- once per optimizer step: gradient check before it, weight check and EMA update after it --------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._guard_gradients()
        self._step_pending = True

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._after_optimizer_step()  # before callbacks' on_train_batch_end, where checkpoints are written

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._after_optimizer_step()  # manual optimization calls no optimizer_step hook

    def _after_optimizer_step(self) -> None:
        """Runs once per optimizer step, not per micro-batch (``accumulate_grad_batches > 1`` fires
        ``on_train_batch_end`` per micro-batch): checks the new weights, then moves the EMA."""
        if not self._step_pending:
            return
        self._step_pending = False
        self._guard_weights()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")
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
    # Three checks, so that the weights the guard saves are always the last finite ones: the loss terms before
    # backward (training_step), the gradients before the optimizer applies them (on_before_optimizer_step), and
    # the weights right after each optimizer step (a finite gradient can still overflow them). The first two stop
    # while the weights are still those the previous step left, which passed the third check.
    def _guard_finite(self, terms: dict[str, Tensor]) -> None:
        bad = [f"{k}={float(v.detach().float().mean())}" for k, v in terms.items() if not torch.isfinite(v).all()]
        self._stop_if_non_finite("loss", bad, rescue=True)

    def _guard_gradients(self) -> None:
        if self._trainer is not None and getattr(self.trainer.strategy.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: the GradScaler skips steps with non-finite gradients and lowers the scale
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        self._stop_if_non_finite("gradient", _non_finite(named), rescue=True)

    def _guard_weights(self) -> None:
        named = [(n, p) for n, p in self.model.named_parameters(prefix="model")]
        self._stop_if_non_finite("weight after the optimizer step", _non_finite(named), rescue=False)

    def _stop_if_non_finite(self, what: str, bad: list[str], rescue: bool) -> None:
        """Raise :class:`NonFiniteLossError` naming the step and ``bad`` (terms or parameters) if any rank found
        one; with ``rescue``, first save the current (still finite) state, unless some tensor of it is not."""
        if self._trainer is None:
            if bad:
                raise NonFiniteLossError(f"non-finite {what}: {', '.join(bad)}")
            return
        # every rank must take the same decision, or the checkpoint save below would deadlock under DDP
        stop = self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False)
        if not stop:
            return
        where = (", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")) or "on another rank"
        head = f"non-finite {what} at step {self.global_step} (epoch {self.current_epoch}): {where}."
        advice = "after lowering the learning rate or enabling gradient clipping (trainer.gradient_clip_val=1.0)."
        ckpt_dir = Path(self.trainer.default_root_dir) / "checkpoints"
        if not rescue:
            raise NonFiniteLossError(
                f"{head} The weights are lost, so no rescue checkpoint is written; resume from the last checkpoint in "
                f"{ckpt_dir} {advice}"
            )
        unsaved = self._non_finite_state()
        if self.trainer.strategy.reduce_boolean_decision(bool(unsaved), all=False):
            raise NonFiniteLossError(
                f"{head} No rescue checkpoint is written: the current state already holds non-finite tensors "
                f"({', '.join(unsaved[:8]) or 'on another rank'}); resume from the last checkpoint in {ckpt_dir} "
                f"{advice}"
            )
        path = ckpt_dir / f"nan-guard-step{self.global_step}.ckpt"
        self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"{head} The last good weights are saved in {path} (the bad step was not applied); resume with "
            f"ckpt_path={path} {advice}"
        )

    def _non_finite_state(self) -> list[str]:
        """Non-finite tensors among what a checkpoint holds of the training state: weights, buffers, EMA and
        optimizer states."""
        named = [(k, v) for k, v in self.state_dict().items() if v.is_floating_point() or v.is_complex()]
        for i, opt in enumerate(self.trainer.optimizers):
            for pid, state in opt.state_dict()["state"].items():
                named += [
                    (f"optimizer{i}.state.{pid}.{k}", v)
                    for k, v in state.items()
                    if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())
                ]
        return _non_finite(named)
