"""The fused Triton row kernel (apps.waveflow.row_triton) computes what RowStepper's torch GEMMs compute.

It runs on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` (slowly: small models here); otherwise the
equality tests skip (CI has no Triton). The choice of path is tested everywhere.
"""

from __future__ import annotations

import pytest
import torch

from apps.waveflow import row_triton
from apps.waveflow.model import RowStepper, WaveFlow
from tests.helpers import triton_test_device


def _model(dilations_h: list[int]) -> WaveFlow:
    """h = 8, one flow of 7 layers (width dilations 1..64), 16 channels, trained-looking output layer."""
    torch.manual_seed(0)
    model = WaveFlow(height=8, n_flows=1, n_layers=7, channels=16, n_mels=4, hop_length=8, dilations_h=dilations_h)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".end." in name:
                p.normal_(0, 0.1)
    return model.fold_weight_norm().eval()


@pytest.mark.parametrize("dilations_h", [[1] * 7, [1, 2, 4, 1, 2, 4, 1]])
def test_fused_rows_synthesize_the_audio_of_the_torch_rows(monkeypatch, dilations_h):
    """Width 40 in blocks of 16 (three programs a row, the last one partial); width dilations up to 64 >= the width
    (taps entirely in the zero padding); height dilations 1 and 1, 2, 4 (windows of non-adjacent rows); batch 2."""
    device = triton_test_device()
    monkeypatch.setattr(row_triton, "BLOCK_W", 16)
    model = _model(dilations_h).to(device)
    mel = torch.randn(2, 4, 40, device=device)
    noise = torch.randn(2, 320, device=device)
    with torch.no_grad():
        want = model.set_row_impl("torch").synthesize(mel, noise=noise)
        got = model.set_row_impl("triton").synthesize(mel, noise=noise)
    assert want.abs().max() > 0.5  # the output layer is not zero: the conditioner's rows matter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision tensor-core products: CUDA only")
def test_fused_rows_in_half_precision_track_float32():
    model = _model([1] * 7).cuda()
    mel, noise = torch.randn(1, 4, 200, device="cuda"), torch.randn(1, 1600, device="cuda")
    with torch.no_grad():
        want = model.set_row_impl("torch").synthesize(mel, noise=noise)
        got = model.half().set_row_impl("triton").synthesize(mel.half(), noise=noise.half()).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_row_impl_choice():
    """auto never picks the interpreter on a CPU (it is slow); an explicit triton without a way to run it says why;
    a wrong name is refused by the model and by the stepper."""
    net = _model([1] * 7).layers[0].net
    like = torch.zeros(1, 8, 40)
    assert not RowStepper(net, 1, 40, like, rows=7, impl="auto").fused
    assert not RowStepper(net, 1, 40, like, rows=7, impl="torch").fused
    if not row_triton.available(torch.device("cpu")):
        with pytest.raises(RuntimeError, match="needs Triton on a CUDA device"):
            RowStepper(net, 1, 40, like, rows=7, impl="triton")
    with pytest.raises(ValueError, match="impl must be"):
        RowStepper(net, 1, 40, like, rows=7, impl="cuda")
    with pytest.raises(ValueError, match="row impl must be"):
        _model([1] * 7).set_row_impl("fast")
    assert row_triton.supports(64) and row_triton.supports(16) and not row_triton.supports(8)
    assert not row_triton.supports(48)


def test_self_check_passes_for_the_kernel_and_catches_a_broken_one(monkeypatch):
    """auto takes the kernel only after it gave a small conditioner's rows as the torch GEMMs do."""
    from apps.waveflow.model import _triton_rows_self_check

    device = triton_test_device()
    check = _triton_rows_self_check.__wrapped__  # uncached
    assert check(str(device), torch.float32, 16, 3) == ""

    original = row_triton.layer_row
    monkeypatch.setattr(row_triton, "layer_row", lambda *a: (original(*a), a[7].mul_(1.5)))  # skip: wrong rows
    assert "relative difference" in check(str(device), torch.float32, 16, 3)
    monkeypatch.setattr(row_triton, "layer_row", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel")))
    assert check(str(device), torch.float32, 16, 3).startswith("RuntimeError: no kernel")


def test_auto_falls_back_to_torch_rows_with_a_warning_when_the_self_check_fails(monkeypatch):
    import apps.waveflow.model as M

    monkeypatch.setattr(row_triton, "available", lambda device=None: True)
    monkeypatch.setattr(M, "_triton_rows_self_check", lambda *a: "RuntimeError: no kernel")
    with pytest.warns(UserWarning, match="not used .RuntimeError: no kernel.; synthesis runs the torch rows"):
        assert not M._use_triton_rows("auto", torch.device("cuda"), 64, torch.float16, 3)
    monkeypatch.setattr(M, "_triton_rows_self_check", lambda *a: "")
    assert M._use_triton_rows("auto", torch.device("cuda"), 64, torch.float16, 3)
    assert not M._use_triton_rows("auto", torch.device("cuda"), 48, torch.float16, 3)  # channels the tiles lack
