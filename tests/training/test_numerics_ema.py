"""EMA of the weights: integer buffers copied exactly, one update per optimizer step, saved in checkpoints."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core import presets
from core.distributions import FlowModel, StandardNormal
from core.flows import MaskedAffineAutoregressive, RandomPermutation, Sequential
from core.training import FlowModule

D = 16  # integer buffers hold values up to D: float averaging truncates 11 -> 10 at decay 0.9999, 3 -> 2 at 0.9995


def _maf_random_order() -> FlowModel:
    order = torch.randperm(D, generator=torch.Generator().manual_seed(3)).tolist()
    layers = [MaskedAffineAutoregressive(D, (32,), order=order), RandomPermutation(D, seed=5)]
    layers.append(MaskedAffineAutoregressive(D, (32,), order=list(reversed(order))))
    return FlowModel(Sequential(layers), StandardNormal(D))


MODELS = {
    "maf_random_order": _maf_random_order,
    "maf_random_permutation": lambda: presets.maf(D, transforms=3, hidden=(32,), permutation="random"),
    "glow_lu": lambda: presets.glow_like(D, transforms=2, hidden=(32,)),
}


def _module(build, decay: float, lr: float = 0.0, **kw) -> FlowModule:
    torch.manual_seed(0)
    return FlowModule(build(), functools.partial(torch.optim.SGD, lr=lr), ema_decay=decay, **kw)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), inference_mode=False,
    )  # fmt: skip
    return pl.Trainer(**{**defaults, **kw})


def _loader(n: int = 64, batch: int = 8, features: int = D) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, features, generator=g)), batch_size=batch)


def _assert_state_equal(ema_model: torch.nn.Module, model: torch.nn.Module) -> None:
    ema_sd, sd = ema_model.state_dict(), model.state_dict()
    assert ema_sd.keys() == sd.keys()
    for k in sd:
        assert ema_sd[k].dtype == sd[k].dtype, k
        assert torch.equal(ema_sd[k], sd[k]), f"EMA entry {k} differs from the model's with identical weights"


@pytest.mark.parametrize("decay", [0.9999, 0.9995])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_numerics_ema_of_identical_weights_is_exactly_the_model(name, decay):
    module = _module(MODELS[name], decay=decay)
    x = torch.randn(32, D)
    module.model.train()
    module.model.log_prob(x)  # ActNorm's data-dependent initialisation, before the first update
    module.model.eval()
    for _ in range(200):
        module.ema.update_parameters(module.model)
    _assert_state_equal(module.ema.module, module.model)
    module.ema.module.eval()
    with torch.no_grad():
        assert torch.equal(module.ema.module.log_prob(x), module.model.log_prob(x))
    for key, value in module.ema.module.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, module.model.state_dict()[key]), key


def test_numerics_ema_through_training_with_zero_learning_rate(tmp_path):
    """The whole path (Lightning hooks included): lr=0 leaves the weights alone, so the EMA must equal them."""
    module = _module(MODELS["maf_random_order"], decay=0.9999)
    _trainer(tmp_path, max_steps=16, max_epochs=100).fit(module, _loader())
    _assert_state_equal(module.ema.module, module.model)


def test_numerics_ema_updates_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    module = _module(MODELS["maf_random_order"], decay=0.9, lr=1e-3)
    trainer = _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, _loader(n=64, batch=8))  # 8 micro-batches, 4 optimizer steps
    assert trainer.global_step == 4
    assert int(module.ema.n_averaged) == trainer.global_step


def test_numerics_ema_is_saved_and_loaded_with_the_checkpoint(tmp_path):
    module = _module(MODELS["glow_lu"], decay=0.9, lr=1e-2)
    trainer = _trainer(tmp_path, max_steps=5, max_epochs=100)
    trainer.fit(module, _loader())
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert int(sd["ema.n_averaged"]) == 5
    ema_keys = {k for k in sd if k.startswith("ema.module.")}
    assert ema_keys == {f"ema.module.{k}" for k in module.model.state_dict()}
    fresh = _module(MODELS["glow_lu"], decay=0.9)
    fresh.load_state_dict(sd)
    _assert_state_equal(fresh.ema.module, module.ema.module)
    assert not torch.equal(sd["ema.module.transform.flows.0.bias"], sd["model.transform.flows.0.bias"])
