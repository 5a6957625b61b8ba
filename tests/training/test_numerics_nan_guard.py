"""The NaN guard stops before a non-finite gradient reaches the weights and never writes non-finite tensors."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core import presets
from core.training import FlowModule, NonFiniteLossError

POISON_STEP = 3


class _Module(FlowModule):
    """Poisons one parameter's gradient at one optimizer step (the loss itself stays finite)."""

    def __init__(self, poison: str, **kw) -> None:
        torch.manual_seed(0)
        super().__init__(presets.realnvp(4, transforms=2, hidden=(16,)), functools.partial(torch.optim.Adam, lr=1e-2),
                         **kw)  # fmt: skip
        self.poison = poison
        name, param = next((n, p) for n, p in self.named_parameters() if n.endswith("bias"))
        self.param_name, self.target = name, [param]  # in a list: an attribute would register the parameter again
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_after_backward(self) -> None:
        self.snapshots[self.global_step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.global_step == POISON_STEP and self.poison == "grad":
            self.target[0].grad[0] = float("nan")


def _fit(module: FlowModule, tmp_path, **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), inference_mode=False,
        max_epochs=1, **kw,
    )  # fmt: skip
    data = torch.randn(128, 4, generator=torch.Generator().manual_seed(1))
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=8))
    return trainer


def _assert_all_finite(obj, where: str = "checkpoint") -> int:
    """Every tensor in a (nested) checkpoint dict is finite; returns how many tensors were checked."""
    if isinstance(obj, torch.Tensor):
        assert not obj.is_floating_point() or torch.isfinite(obj).all(), f"non-finite tensor at {where}"
        return 1
    if isinstance(obj, dict):
        return sum(_assert_all_finite(v, f"{where}.{k}") for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_assert_all_finite(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return 0


@pytest.mark.parametrize("ema", [None, 0.99], ids=["plain", "ema"])
def test_numerics_nan_guard_stops_before_a_poisoned_gradient_is_applied(tmp_path, ema):
    module = _Module("grad", ema_decay=ema)
    with pytest.raises(NonFiniteLossError) as err:
        _fit(module, tmp_path)
    message = str(err.value)
    assert f"step {POISON_STEP}" in message and module.param_name in message and "gradient" in message
    path = tmp_path / "checkpoints" / f"nan-guard-step{POISON_STEP}.ckpt"
    assert str(path) in message and path.is_file()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == POISON_STEP
    assert _assert_all_finite(ckpt) > 0
    # the rescued weights are the last good ones: those the poisoned step started from
    for k, v in module.snapshots[POISON_STEP].items():
        assert torch.equal(ckpt["state_dict"][f"model.{k}"], v), k
    # and the module loads from it
    fresh = _Module("none", ema_decay=ema)
    fresh.load_state_dict(ckpt["state_dict"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    # the module's own weights were never touched by the bad gradient
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_numerics_nan_guard_with_gradient_accumulation_names_the_optimizer_step(tmp_path):
    module = _Module("grad")
    with pytest.raises(NonFiniteLossError, match=rf"step {POISON_STEP}\b"):
        _fit(module, tmp_path, accumulate_grad_batches=2)
    ckpt = torch.load(tmp_path / "checkpoints" / f"nan-guard-step{POISON_STEP}.ckpt", weights_only=False)
    _assert_all_finite(ckpt)


class _BlowUp(torch.optim.SGD):
    """An optimizer whose update overflows at one step although every gradient is finite."""

    def __init__(self, params, lr: float, at: int) -> None:
        super().__init__(params, lr=lr)
        self.at, self.calls = at, 0

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        if self.calls == self.at:
            self.param_groups[0]["params"][0].mul_(float("inf"))
        self.calls += 1
        return out


def test_numerics_nan_guard_catches_weights_that_an_optimizer_step_made_non_finite(tmp_path):
    module = _Module("none")
    module.optimizer_factory = functools.partial(_BlowUp, lr=1e-3, at=POISON_STEP)
    name = next(n for n, p in module.named_parameters() if p.requires_grad)
    with pytest.raises(NonFiniteLossError) as err:
        _fit(module, tmp_path)
    message = str(err.value)
    assert f"step {POISON_STEP}" in message and name in message and "weight" in message
    assert "no rescue checkpoint" in message
    assert not list(tmp_path.rglob("*.ckpt")), "the guard must not write a checkpoint of non-finite weights"


def test_numerics_nan_guard_poisoned_loss_still_saves_finite_weights(tmp_path):
    module = _Module("none")
    original = module.loss_terms

    def poisoned(batch, model):
        terms = original(batch, model)
        if module.global_step == POISON_STEP:
            terms["nll"] = terms["nll"] * float("nan")
        return terms

    module.loss_terms = poisoned
    with pytest.raises(NonFiniteLossError, match=rf"step {POISON_STEP} .*nll=nan"):
        _fit(module, tmp_path)
    _assert_all_finite(torch.load(tmp_path / "checkpoints" / f"nan-guard-step{POISON_STEP}.ckpt", weights_only=False))
