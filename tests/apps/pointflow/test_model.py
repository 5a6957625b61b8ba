"""PointFlow's model pieces: the moving batch-norm around each CNF and the auto-encoder objective."""

from __future__ import annotations

import torch

from apps.pointflow.model import MovingBatchNorm, PointFlowModel
from core.flows import CNF
from core.training import build_module
from tests.helpers import small_config


def test_moving_batch_norm_uses_the_running_statistics_and_updates_them_in_training():
    bn = MovingBatchNorm(3, eps=1e-4, decay=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(4, 10, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]) + 5.0
    m0, v0 = bn.running_mean.clone(), bn.running_var.clone()
    log_scale = bn.weight - 0.5 * torch.log(v0 + 1e-4)
    want = (x - m0) * log_scale.exp() + bn.bias  # the reference: (x - m) / sqrt(v + eps) * exp(w) + b

    bn.eval()
    y, logdet = bn(x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(logdet, torch.full((4,), 10 * log_scale.sum().item(), dtype=torch.float64))
    assert torch.equal(bn.running_mean, m0) and torch.equal(bn.running_var, v0), "eval mode must not update"

    bn.train()  # bn_lag = 0: the map uses the statistics before this batch, then moves them towards the batch's
    y_train, logdet_train = bn(x)
    torch.testing.assert_close(y_train, want)
    torch.testing.assert_close(logdet_train, logdet)
    flat = x.reshape(-1, 3)
    torch.testing.assert_close(bn.running_mean, m0 - 0.1 * (m0 - flat.mean(0)))
    torch.testing.assert_close(bn.running_var, v0 - 0.1 * (v0 - flat.var(0)))
    bn.eval()
    m1 = bn.running_mean.clone()
    torch.testing.assert_close(bn.inverse(bn(x)[0])[0], x)
    assert torch.equal(bn.running_mean, m1), "inverse (sampling) never updates the statistics"


def test_model_puts_a_moving_batch_norm_around_each_cnf():
    model = PointFlowModel(zdim=4, point_hidden=(8,), latent_hidden=(8,), point_blocks=2)
    kinds = [type(m).__name__ for m in model.point_flow.flows]
    assert kinds == ["MovingBatchNorm", "CNF", "MovingBatchNorm", "CNF", "MovingBatchNorm"]
    assert [type(m).__name__ for m in model.latent.transform.flows] == ["MovingBatchNorm", "CNF", "MovingBatchNorm"]
    plain = PointFlowModel(zdim=4, point_hidden=(8,), latent_hidden=(8,), batch_norm=False)
    assert all(isinstance(m, CNF) for m in plain.point_flow.flows)


def test_autoencoder_experiment_is_the_reconstruction_term_alone(tmp_path):
    cfg = small_config(
        "pointflow", tmp_path, "experiment=ae", "model.zdim=4", "model.point_hidden=[8]", "model.atol=1e-3",
        "model.rtol=1e-3",
    )  # fmt: skip
    module = build_module(cfg)
    model = module.model
    assert model.latent is None and model.encoder.deterministic and model.encoder.logvar_head is None
    assert module.weights == {"recon": 1.0, "prior": 0.0, "entropy": 0.0}
    x = torch.randn(3, 32, 3)
    module.loss_terms({"x": x}, model.train())  # a training step: moves the batch-norm statistics
    model.eval()
    torch.manual_seed(0)
    terms = module.loss_terms({"x": x}, model)
    assert terms["prior"].item() == 0.0 and terms["neg_entropy"].item() == 0.0
    # nothing but -log p(X|z) is in the loss: no entropy to grow, no prior to pay for it
    torch.manual_seed(0)
    torch.testing.assert_close(sum(terms.values()), -model.point_log_prob(x, model.encode(x)).mean())
    # the reference's encode(): a deterministic encoder gives the same latent every time
    torch.testing.assert_close(model.encode(x), model.encode(x))
