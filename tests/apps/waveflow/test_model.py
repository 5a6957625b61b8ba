"""WaveFlow's model: squeeze, orders, causality along height, fast == naive inverse, sizes of the paper models."""

from __future__ import annotations

import pytest
import torch

from apps.waveflow.model import (
    MelUpsampler,
    WaveFlow,
    WaveFlowLayer,
    _ConvGate,
    default_height_dilations,
    height_orders,
    squeeze,
    unsqueeze,
)


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():  # leave the identity initialisation (zero output convs) so the checks have teeth
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_squeeze_layout_and_round_trip():
    x = torch.arange(2 * 48).reshape(2, 48).float()
    s = squeeze(x, 16)
    assert s.shape == (2, 16, 3)
    assert s[1, 5, 2] == x[1, 2 * 16 + 5]  # column j holds samples j*h .. j*h + h - 1
    torch.testing.assert_close(unsqueeze(s), x)
    with pytest.raises(ValueError, match="multiple of the height"):
        squeeze(torch.zeros(1, 50), 16)


def test_paper_orders_and_dilations():
    orders = height_orders(8, 8, "paper")
    nat, rev, bip = list(range(8)), list(range(8))[::-1], [3, 2, 1, 0, 7, 6, 5, 4]
    assert orders == [nat, rev, nat, rev, nat, bip, nat, bip]
    assert height_orders(8, 3, "none") == [nat] * 3
    assert default_height_dilations(64, 8) == [1, 2, 4, 8, 16, 1, 2, 4]
    assert default_height_dilations(16, 8) == [1] * 8  # receptive field 17 rows >= h
    assert default_height_dilations(16, 4) == [1, 2, 4, 8]
    assert default_height_dilations(8, 5) == [1, 2, 4, 1, 2]
    for h, n in ((8, 4), (16, 4), (32, 5), (64, 6)):  # enough layers: the causal field covers all rows
        assert 1 + 2 * sum(default_height_dilations(h, n)) >= h


@pytest.mark.parametrize("order", [None, [4, 1, 5, 0, 3, 2]])
def test_layer_is_causal_along_height(order):
    """Changing row order[k] of the input never changes the output rows order[:k]; it does change row order[k]."""
    torch.manual_seed(0)
    layer = WaveFlowLayer(6, context_channels=3, channels=8, n_layers=3, dilations_h=[1, 2, 1], order=order).double()
    _perturb(layer)
    order = order or list(range(6))
    x, c = torch.randn(2, 6, 10, dtype=torch.float64), torch.randn(2, 3, 6, 10, dtype=torch.float64)
    z, _ = layer(x, c)
    for k, row in enumerate(order):
        x2 = x.clone()
        x2[:, row] += torch.randn(2, 10, dtype=torch.float64)
        z2, _ = layer(x2, c)
        before = order[:k]
        torch.testing.assert_close(z2[:, before], z[:, before], rtol=0, atol=0)
        assert (z2[:, row] - z[:, row]).abs().max() > 1e-3
        if k + 1 < len(order):  # and the rows after it see the change (the conditioner is not trivially blind)
            assert (z2[:, order[k + 1 :]] - z[:, order[k + 1 :]]).abs().max() > 1e-6


def test_width_is_not_causal():
    """Along width the convolution looks both ways: a later column changes an earlier column's transform."""
    torch.manual_seed(0)
    layer = WaveFlowLayer(4, context_channels=0, channels=8, n_layers=2).double()
    _perturb(layer)
    x = torch.randn(1, 4, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 0, 7] += 1.0
    z, z2 = layer(x)[0], layer(x2)[0]
    assert (z2[:, 1:, 6] - z[:, 1:, 6]).abs().max() > 1e-6


@pytest.mark.parametrize("height,permutation", [(16, "paper"), (32, "paper"), (8, "reverse")])
def test_fast_synthesis_equals_naive_inverse(height, permutation):
    torch.manual_seed(0)
    model = WaveFlow(height=height, n_flows=4, n_layers=4, channels=8, n_mels=10, permutation=permutation).eval()
    _perturb(model, 0.05)
    mel = torch.randn(2, 10, 3)
    noise = torch.randn(2, 3 * 256)
    with torch.inference_mode():
        fast = model.synthesize(mel, sigma=0.8, noise=noise)
        naive = model.synthesize(mel, sigma=0.8, noise=noise, fast=False)
    assert fast.shape == (2, 768) and fast.abs().max() > 0.1
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    # and the waveform maps back to the same noise
    with torch.no_grad():
        z, _ = model.flow.transform(fast, model.condition(mel, 768))
    torch.testing.assert_close(unsqueeze(z), 0.8 * noise, atol=1e-4, rtol=1e-4)


def test_log_prob_matches_change_of_variables():
    torch.manual_seed(0)
    model = WaveFlow(height=8, n_flows=2, n_layers=2, channels=8, n_mels=10).double()
    _perturb(model, 0.05)
    mel, x = torch.randn(1, 10, 2, dtype=torch.float64), 0.1 * torch.randn(1, 512, dtype=torch.float64)
    c = model.condition(mel, 512)
    jac = torch.autograd.functional.jacobian(lambda t: unsqueeze(model.flow.transform(t, c)[0]), x)[0, :, 0]
    z = unsqueeze(model.flow.transform(x, c)[0])
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(model.log_prob(x, mel)[0], expected)


def test_upsampler_and_condition_lengths():
    up = MelUpsampler((16, 16))
    assert up(torch.randn(2, 80, 7)).shape == (2, 80, 7 * 256)
    model = WaveFlow(height=16, n_flows=2, n_layers=2, channels=8)
    assert model.condition(torch.randn(1, 80, 4), 1024).shape == (1, 80, 16, 64)
    with pytest.raises(ValueError, match="cover"):
        model.condition(torch.randn(1, 80, 4), 2048)
    with pytest.raises(ValueError, match="mel of shape"):
        model.condition(torch.randn(1, 40, 4), 512)
    with pytest.raises(ValueError, match="height"):
        WaveFlow(height=128)


@pytest.mark.parametrize("channels,paper_millions", [(64, 5.91), (128, 22.25)])
def test_paper_model_sizes(channels, paper_millions):
    n = sum(p.numel() for p in WaveFlow(height=16, n_flows=8, n_layers=8, channels=channels).parameters())
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.002, n  # weight norm's g included, as the references


# ---- the references' model: weight norm, first row, no unused parameters, one source for the hop ---------------
def test_every_conv_but_the_output_is_weight_normalised_and_folding_keeps_the_audio():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = WaveFlow(height=8, n_flows=2, n_layers=3, channels=8, n_mels=10, hop_length=16).eval()
    _perturb(model, 0.05)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    normed = [m for m in convs if parametrize.is_parametrized(m, "weight")]
    ends = [layer.net.end for layer in model.layers]
    assert len(normed) == len(convs) - len(ends) and not any(parametrize.is_parametrized(e, "weight") for e in ends)
    assert all(parametrize.is_parametrized(m, "weight") for m in model.upsampler.layers)
    mel, noise = torch.randn(2, 10, 5), torch.randn(2, 80)
    with torch.inference_mode():
        before = model.synthesize(mel, noise=noise)
        lp_before = model.log_prob(before, mel)
    n_before = sum(p.numel() for p in model.parameters())
    model.fold_weight_norm()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < n_before  # one weight per conv instead of (g, v)
    with torch.inference_mode():
        after = model.synthesize(mel, noise=noise)
        lp_after = model.log_prob(before, mel)
    assert before.abs().max() > 0.1
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_after, lp_before, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("first_row,steps", [("copy", 15), ("transform", 16)])
def test_first_row_convention_and_row_steps(first_row, steps, monkeypatch):
    """copy (the references): the first row of each flow's order passes through unchanged and synthesis takes h-1
    row steps per flow; transform (the paper's equations): that row changes too, h steps."""
    from apps.waveflow.model import RowStepper

    torch.manual_seed(0)
    model = WaveFlow(height=16, n_flows=2, n_layers=2, channels=8, n_mels=10, first_row=first_row).eval()
    _perturb(model, 0.1)
    x, c = torch.randn(2, 16, 6), torch.randn(2, 10, 16, 6)
    for layer in model.layers:
        z, _ = layer(x, c)
        first = layer.order_list[0]
        unchanged = torch.equal(z[:, first], x[:, first])
        assert unchanged == (first_row == "copy")
        assert (z[:, layer.order_list[1]] - x[:, layer.order_list[1]]).abs().max() > 1e-3
    calls = []
    real_step = RowStepper.step
    monkeypatch.setattr(RowStepper, "step", lambda self, *a: calls.append(1) or real_step(self, *a))
    with torch.inference_mode():
        model.synthesize(torch.randn(1, 10, 1))
    assert len(calls) == steps * 2  # per flow


@pytest.mark.parametrize("first_row", ["copy", "transform"])
@pytest.mark.parametrize("context_channels", [3, 0])
def test_fast_stepper_equals_the_differentiable_step_and_the_naive_inverse(first_row, context_channels):
    """The no-grad RowStepper (row histories, folded output conv, GEMMs on shifted views, tanh + GLU gate) against the
    list-cache step with autograd on, with height dilations 1, 2 and 4 (strided windows), a width dilation (8)
    wider than the matrix (7 columns), a batch of 2 and a bipartite order; with and without a mel."""
    torch.manual_seed(0)
    layer = WaveFlowLayer(
        8, context_channels=context_channels, channels=6, n_layers=4, dilations_h=[1, 2, 4, 1],
        order=[3, 2, 1, 0, 7, 6, 5, 4], first_row=first_row,
    ).double()  # fmt: skip
    _perturb(layer, 0.2)
    z = torch.randn(2, 8, 7, dtype=torch.float64)
    c = torch.randn(2, 3, 8, 7, dtype=torch.float64) if context_channels else None
    with torch.no_grad():
        fast, ld_fast = layer.inverse(z, c)
        naive, ld_naive = layer.inverse_naive(z, c)
        one, _ = layer.inverse(z[1:], None if c is None else c[1:])  # batch 1 takes the 2-D GEMM path
    slow, ld_slow = layer.inverse(z.requires_grad_(), c)  # autograd on: the list-cache path
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(one, fast[1:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_fast, ld_slow.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_fast, ld_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(fast, c)[0], z.detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("context_channels", [3, 0])
def test_parallel_pass_equals_the_row_steps_in_values_and_parameter_gradients(context_channels):
    """``WaveNet2D.forward`` (training: mel projections added by their GEMMs, one-node gate, output conv folded into
    the skips) is the function the row-by-row ``step`` computes with the modules as written: the same (log_s, t)
    and the same gradient for every parameter and the mel (float64), with height dilations 1 and 2 and a width
    dilation wider than the matrix."""
    torch.manual_seed(0)
    layer = WaveFlowLayer(8, context_channels=context_channels, channels=6, n_layers=4, dilations_h=[1, 2, 1, 2])
    net = layer.net.double()
    _perturb(net, 0.2)
    x = torch.randn(2, 1, 8, 7, dtype=torch.float64)
    c = torch.randn(2, 3, 8, 7, dtype=torch.float64, requires_grad=True) if context_channels else None
    parallel = net(x, c)  # (B, 2, rows, W)
    caches = net.start_rows(2, 7, x)
    rows = [net.step(x[:, :, i : i + 1], None if c is None else c[:, :, i : i + 1], caches) for i in range(8)]
    stepped = torch.cat(rows, dim=2)
    torch.testing.assert_close(parallel, stepped, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(parallel)
    inputs = [p for p in net.parameters()] + ([c] if c is not None else [])
    for a, b in zip(
        torch.autograd.grad((parallel * weight).sum(), inputs), torch.autograd.grad((stepped * weight).sum(), inputs)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_mel", [True, False])
def test_conv_gate_node_is_conv_plus_mel_then_tanh_times_sigmoid_with_its_gradient(with_mel):
    """The fused training node (:class:`_ConvGate`): dilated convolution of the padded input + mel projection, then
    tanh * sigmoid, in (B rows W, C) layout; its hand-written backward passes gradcheck for every input (float64)."""
    torch.manual_seed(0)
    B, C, M, rows, width, dil = 2, 3, 4, 3, 5, (1, 2)
    padded = torch.randn(B, C, rows + 2, width + 4, dtype=torch.float64).permute(0, 2, 3, 1).contiguous()
    padded = padded.permute(0, 3, 1, 2).requires_grad_()  # channels-last memory, as WaveNet2D.forward passes it
    weight = torch.randn(2 * C, C, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * C, dtype=torch.float64, requires_grad=True)
    mel = torch.randn(B * rows * width, M, dtype=torch.float64, requires_grad=True) if with_mel else None
    w_mel = torch.randn(2 * C, M, dtype=torch.float64, requires_grad=True) if with_mel else None
    a = torch.nn.functional.conv2d(padded, weight, bias, dilation=dil).permute(0, 2, 3, 1).reshape(-1, 2 * C)
    if with_mel:
        a = a + mel @ w_mel.t()
    expected = torch.tanh(a[:, :C]) * torch.sigmoid(a[:, C:])
    torch.testing.assert_close(_ConvGate.apply(padded, weight, bias, mel, w_mel, dil), expected)
    assert torch.autograd.gradcheck(lambda *t: _ConvGate.apply(*t, dil), (padded, weight, bias, mel, w_mel))


def test_parallel_pass_trains_under_bf16_autocast():
    """``trainer.precision=bf16-mixed``: the fused node and the in-place GEMMs (not autocast themselves) run under
    autocast, the gradients come back float32, and loss and gradients stay near float32's."""
    torch.manual_seed(0)
    model = WaveFlow(height=8, n_flows=2, n_layers=3, channels=8, n_mels=5, hop_length=16)
    _perturb(model, 0.2)
    audio, mel = 0.1 * torch.randn(2, 256), torch.randn(2, 5, 17)

    def loss_and_grads(bf16: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = -model.log_prob(audio, mel).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (l32, g32), (l16, g16) = loss_and_grads(False), loss_and_grads(True)
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert abs(l16 - l32) < 0.02 * abs(l32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_last_layer_has_no_unused_parameters():
    """The last conditioner layer's 1x1 has only the skip half (the references' layout): every output channel of
    every 1x1 gets a gradient, and the paper model has the paper's 5.91 M parameters."""
    torch.manual_seed(0)
    model = WaveFlow(height=8, n_flows=2, n_layers=3, channels=8, n_mels=10, hop_length=16)
    _perturb(model, 0.1)
    for layer in model.layers:
        assert layer.net.blocks[-1].out.weight.shape[0] == 8 and layer.net.blocks[0].out.weight.shape[0] == 16
    x, mel = 0.1 * torch.randn(2, 64), torch.randn(2, 10, 4)
    (-model.log_prob(x, mel).sum()).backward()
    for layer in model.layers:
        for block in layer.net.blocks:
            g = block.out.parametrizations.weight.original1.grad  # v of the weight norm (out, in, 1, 1)
            assert (g.flatten(1).abs().sum(1) > 0).all(), "an output channel of a 1x1 conv gets no gradient"


def test_hop_mismatch_is_refused_with_both_numbers():
    with pytest.raises(ValueError, match=r"upsample the mel by 256, but data.hop_length=128"):
        WaveFlow(height=8, n_flows=1, n_layers=1, channels=4, hop_length=128, upsample_factors=[16, 16])
    model = WaveFlow(height=8, n_flows=1, n_layers=1, channels=4, hop_length=128)  # derived from the hop
    assert model.hop == 128 and model.upsampler.factors == [16, 8]
    assert model.condition(torch.randn(1, 80, 3), 384).shape == (1, 80, 8, 48)
    with pytest.raises(ValueError, match=r"upsamples the mel by 128 .* hop length is 256"):
        model.check_hop(256)
    with pytest.raises(ValueError, match="even hop"):
        WaveFlow(hop_length=275)


def test_train_config_derives_the_hop_from_the_data(tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from tests.helpers import small_config

    cfg = small_config("waveflow", tmp_path, "data.hop_length=128")
    assert instantiate(cfg.model).hop == 128
    cfg = small_config("waveflow", tmp_path, "data.hop_length=128", "model.upsample_factors=[16,16]")
    with pytest.raises(InstantiationException, match="256, but data.hop_length=128"):
        instantiate(cfg.model)
