"""The speed protocol (Parakeet's benchmark: warm-up excluded, repeats, batch sizes apart), the static-buffer
synthesis the CUDA graph captures (run eagerly on the CPU), and the benchmark script at toy sizes."""

from __future__ import annotations

import json

import pytest
import torch

from apps.waveflow.commands import benchmark_synthesis, measure_rtf, prepare_for_inference
from apps.waveflow.cuda_graph import GraphSynthesizer
from apps.waveflow.model import WaveFlow


def test_measure_rtf_excludes_the_warm_up():
    """A first call that is slow (compilation, plan caches) is run but not timed: the median is of the repeats."""
    durations = iter([5.0, 0.5, 0.4, 0.6])
    calls = []

    def run() -> float:
        calls.append(1)
        return next(durations)

    r = measure_rtf(run, audio_seconds=2.0, warmup=1, repeats=3)
    assert len(calls) == 4 and r["warmup_seconds"] == [5.0] and r["seconds"] == [0.5, 0.4, 0.6]
    assert r["seconds_median"] == 0.5 and r["x_real_time"] == pytest.approx(4.0) and r["rtf"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_rtf(run, 1.0, repeats=0)


def _tiny() -> WaveFlow:
    torch.manual_seed(0)
    model = WaveFlow(height=8, n_flows=2, n_layers=2, channels=8, n_mels=10, hop_length=16)
    with torch.no_grad():
        for layer in model.layers:
            layer.net.end.weight.normal_(0, 0.1)
    return prepare_for_inference(model, torch.device("cpu"), torch.float32)


def test_benchmark_counts_the_audio_of_the_whole_batch(monkeypatch):
    import apps.waveflow.commands as commands

    model = _tiny()
    shapes = []
    monkeypatch.setattr(commands, "timed_synthesis", lambda m, mel, s: (shapes.append(tuple(mel.shape)), 0.5))
    r = benchmark_synthesis(model, torch.randn(1, 10, 20), batch=8, warmup=1, repeats=2, sample_rate=160)
    assert shapes == [(8, 10, 20)] * 3  # one warm-up + two repeats, each of batch 8
    assert r["batch"] == 8 and r["audio_seconds"] == pytest.approx(8 * 20 * 16 / 160)
    assert r["x_real_time"] == pytest.approx(32.0)  # 16 s of audio in 0.5 s


def test_graph_synthesizer_static_buffers_equal_eager_synthesis():
    """The code the CUDA graph captures (static mel/noise buffers, noise drawn outside), run eagerly on the CPU."""
    model = _tiny()
    mel, noise = torch.randn(2, 10, 3), torch.randn(2, 48)
    synth = GraphSynthesizer(model, batch=2, frames=3, sigma=0.7, capture=False)
    with torch.inference_mode():
        expected = model.synthesize(mel, sigma=0.7, noise=noise)
    torch.testing.assert_close(synth(mel, noise), expected)
    out = synth(mel)  # noise drawn into the static buffer
    assert out.shape == (2, 48) and torch.isfinite(out).all() and not torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"captured for mels of shape \(2, 10, 3\)"):
        synth(torch.randn(1, 10, 3))
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GraphSynthesizer(model, 1, 3, capture=True)


def test_benchmark_script_quick(tmp_path):
    from scripts.bench_waveflow import main

    main(["--quick", "--device", "cpu", "--profile", "--json", str(tmp_path / "b.json")])
    rows = json.loads((tmp_path / "b.json").read_text())
    synth = [r for r in rows if r["what"] == "synthesis"]
    assert [r["batch"] for r in synth] == [1, 2] and all(r["x_realtime"] > 0 for r in synth)
    assert any(r["what"].startswith("train step") and r["time_s"] > 0 for r in rows)
    # --profile: per batch, a summary row (all ops' self time, at most the call's wall time) and the top ops by share
    for batch in (1, 2):
        prof = [r for r in rows if r["what"] == "profile" and r["batch"] == batch]
        total, top = prof[0], prof[1:]
        assert total["kernel"] == "(all ops)" and 0 < total["total_ms"] <= total["wall_ms"] * 1.05
        assert top and all(a["total_ms"] >= b["total_ms"] for a, b in zip(top, top[1:]))
        assert sum(r["share"] for r in top) <= 1 + 1e-9 and any("addmm" in r["kernel"] for r in top)


def test_bf16_synthesis_tracks_fp32():
    """The half-precision path (what a GPU runs in bf16/fp16) on the CPU: same code, audio close to fp32's."""
    model = _tiny()
    mel, noise = torch.randn(1, 10, 4), torch.randn(1, 64)
    with torch.inference_mode():
        ref = model.synthesize(mel, noise=noise)
    half = prepare_for_inference(_tiny(), torch.device("cpu"), torch.bfloat16)
    out = GraphSynthesizer(half, batch=1, frames=4, capture=False)(mel, noise)
    assert out.dtype == torch.bfloat16 and ref.abs().max() > 0.1
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU check runs it)")
def test_captured_graph_replay_equals_eager_synthesis_on_cuda():
    """The captured CUDA graph, replayed twice with new inputs, gives the eager synthesis of those inputs."""
    model = prepare_for_inference(_tiny(), torch.device("cuda"), torch.float32)
    synth = GraphSynthesizer(model, batch=2, frames=3, sigma=0.7)
    assert synth.graph is not None
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        mel = torch.randn(2, 10, 3, device="cuda", generator=g)
        noise = torch.randn(2, 48, device="cuda", generator=g)
        with torch.inference_mode():
            expected = model.synthesize(mel, sigma=0.7, noise=noise)
        torch.testing.assert_close(synth(mel, noise), expected, rtol=1e-5, atol=1e-5)
