"""WaveFlow end to end: training lowers the NLL, train -> synthesize -> evaluate through the CLI, bad input, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from apps.waveflow.audio import MelSpectrogram, load_wav
from core.training import build_module, fit
from tests.helpers import run_cli, small_config

BUILTIN = Path(__file__).resolve().parents[3] / "data" / "waveflow" / "ljspeech"
TINY = [
    "model.height=8", "model.n_flows=2", "model.n_layers=2", "model.channels=8", "data.segment_length=2048",
    "data.batch_size=2", "data.eval_batch_size=3", "data.train_repeat=1", "module.sample_seconds=0.25",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("waveflow_run")
    cfg = small_config("waveflow", out, *TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                       "module.sample_every_n_epochs=1")  # fmt: skip
    result = fit(cfg)
    assert result.trainer.global_step == 3
    assert np.isfinite(result.metrics["test/ll_per_sample"])
    assert list((out / "media").glob("sample_epoch*.wav")) and list((out / "media").glob("mel_epoch*.png"))
    return out


def test_training_lowers_the_nll(tmp_path):
    cfg = small_config(
        "waveflow", tmp_path, *TINY, "trainer.max_epochs=4", "module.sample_every_n_epochs=0",
        "callbacks.checkpoint=null", "callbacks.step_checkpoint=null", "test_after_fit=false",
        "module.optimizer.lr=3e-3",
    )  # fmt: skip
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    before_module = build_module(cfg)
    with torch.no_grad():
        before = before_module.loss_terms(batch, before_module.model.eval())["nll"].item() / 2048
    result = fit(cfg)
    with torch.no_grad():
        after = result.module.loss_terms(batch, result.module.eval_model.eval())["nll"].item() / 2048
    # 52 steps of a tiny model on 2048-sample segments, in nats per sample on the fixed val segments
    assert after < before - 0.5, f"NLL per sample {before:.3f} -> {after:.3f} nats"


def test_synthesize_from_checkpoint_writes_valid_wavs(trained, tmp_path):
    mels = tmp_path / "mels"
    mels.mkdir()
    audio = load_wav(BUILTIN / "wavs" / "LJ001-0002.wav")
    mel = MelSpectrogram()(torch.from_numpy(audio)).numpy()
    np.save(mels / "tts_output.npy", mel)
    np.save(mels / "transposed.npy", mel.T)  # (frames, n_mels) from some TTS models
    (mels / "broken.npy").write_bytes(b"nonsense")
    proc = run_cli("waveflow", "synthesize", f"ckpt={trained}", f"input={mels}", "sigma=0.7",
                   f"hydra.run.dir={tmp_path / 's'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr  # Hydra's log handler writes to stdout
    assert "skipped 1 of 3 files" in logs and "broken.npy" in logs
    for name in ("tts_output", "transposed"):
        data, sr = sf.read(tmp_path / "s" / "wavs" / f"{name}.wav")
        assert sr == 22050 and data.shape == (mel.shape[1] * 256,) and np.isfinite(data).all() and data.std() > 0
    summary = json.loads((tmp_path / "s" / "synthesis.json").read_text())
    assert summary["x_real_time"] > 0 and len(summary["files"]) == 2

    wav = BUILTIN / "wavs" / "LJ001-0008.wav"
    proc = run_cli("waveflow", "synthesize", f"ckpt={trained}", f"input={wav}", f"hydra.run.dir={tmp_path / 'w'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data, sr = sf.read(tmp_path / "w" / "wavs" / "LJ001-0008.wav")
    assert sr == 22050 and len(data) == len(load_wav(wav))  # a resynthesis has the input's length


def test_bad_input_is_named(trained, tmp_path):
    from apps.waveflow.audio import AudioError
    from apps.waveflow.commands import synthesize
    from core.cli import compose

    bad = tmp_path / "mel.npy"
    np.save(bad, np.zeros((3, 40, 5), np.float32))
    cfg = compose("waveflow", "synthesize", [f"output_dir={tmp_path / 'o'}", f"ckpt={trained}", f"input={bad}"])
    with pytest.raises(AudioError, match=r"mel.npy: expected a log-mel of shape \(80, frames\), got \(3, 40, 5\)"):
        synthesize(cfg)
    cfg = compose("waveflow", "synthesize", [f"output_dir={tmp_path / 'o'}", f"ckpt={trained}", "input=nowhere.wav"])
    with pytest.raises(FileNotFoundError, match="input=nowhere.wav: no such file"):
        synthesize(cfg)


def test_evaluate_reports_likelihood_mel_l1_mcd_and_speed(trained, tmp_path):
    proc = run_cli("waveflow", "evaluate", f"ckpt={trained}", "max_utterances=2", "rtf.frames=4", "rtf.repeats=2",
                   f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_utterances"] == 2 and m["split"] == "test"
    # the test set is named, with its size: the references' held-out utterances the built-in clips hold
    assert "references' held-out set" in m["test_set"] and "(3 utterances: LJ001-0002" in m["test_set"]
    for key in ("test_ll_per_sample_nats", "mel_l1", "mcd_db", "x_real_time_batch1", "x_real_time_batch8"):
        assert np.isfinite(m[key]), key
    # Parakeet's protocol: one warm-up call, then the timed repeats, batch 1 and batch 8 apart
    protocol = [(s["batch"], s["warmup"], len(s["seconds"]), s["frames"]) for s in m["speed"]]
    assert protocol == [(1, 1, 2, 4), (8, 1, 2, 4)]
    assert m["mel_l1"] > 0 and m["mcd_db"] > 0 and len(list((tmp_path / "wavs").glob("*.wav"))) == 2
    assert "test_ll_per_sample_nats" in proc.stdout


def test_evaluate_refuses_a_mel_hop_the_model_was_not_trained_for(trained, tmp_path):
    proc = run_cli("waveflow", "evaluate", f"ckpt={trained}", "+data.hop_length=128", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "upsamples the mel by 256" in proc.stderr and "hop length is 128" in proc.stderr


def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli(
        "waveflow", "train", "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=csv", *TINY,
        "module.sample_every_n_epochs=0", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["global_step"] == 6  # 26 clips: 13 per rank, batches of 2 with drop_last
    assert np.isfinite(m["test/nll"]) and (tmp_path / "checkpoints" / "last.ckpt").is_file()
