"""WaveFlow commands: train, synthesize, evaluate. Each takes the composed Hydra config."""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from apps.waveflow.audio import AudioError, MelConfig, MelSpectrogram, load_wav, save_wav
from apps.waveflow.metrics import mel_cepstral_distortion, mel_l1
from apps.waveflow.model import WaveFlow
from core.metrics import nats_to_bits_per_dim
from core.training import Restored, fit, restore
from core.training.reporting import print_metrics, resolve_device
from core.training.runner import write_json

__all__ = [
    "train", "synthesize", "evaluate", "COMMANDS", "DESCRIPTIONS", "prepare_for_inference", "timed_synthesis",
    "measure_rtf", "benchmark_synthesis",
]  # fmt: skip

log = logging.getLogger(__name__)


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    choices = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in choices:
        raise ValueError(f"precision={precision!r}: choose auto, fp32, fp16 or bf16")
    return choices[precision]


def prepare_for_inference(model: WaveFlow, device: torch.device, dtype: torch.dtype) -> WaveFlow:
    """Weight norm folded (the same function, one weight per conv), eval mode, on ``device`` in ``dtype`` (in place).
    On a GPU, :class:`apps.waveflow.cuda_graph.GraphSynthesizer` removes the launch overhead of the row steps."""
    return model.fold_weight_norm().to(device=device, dtype=dtype).eval()


def timed_synthesis(model: WaveFlow, mel: torch.Tensor, sigma: float, length: int | None = None, fast: bool = True):
    """(audio (B, T) float32, seconds) under ``torch.inference_mode``, synchronising the GPU around the call."""
    dtype = next(model.parameters()).dtype
    sync = torch.cuda.synchronize if mel.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        audio = model.synthesize(mel.to(dtype), sigma=sigma, length=length, fast=fast)
        sync()
    return audio.float(), time.perf_counter() - t0


def measure_rtf(run: Callable[[], float], audio_seconds: float, warmup: int = 1, repeats: int = 10) -> dict:
    """Speed as Parakeet's WaveFlow benchmark measures it: ``warmup`` untimed calls first (compilation, allocator and
    oneDNN/cuDNN plan caches), then ``repeats`` timed ones; ``run()`` synthesises once and returns its own seconds.

    Returns the median and every timed call: ``x_real_time`` = audio seconds (all of the batch) / synthesis seconds,
    ``rtf`` its inverse (the paper's 42.6x is ``x_real_time``)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure_rtf: warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    warm = [run() for _ in range(warmup)]
    times = [run() for _ in range(repeats)]
    t = statistics.median(times)
    return {
        "audio_seconds": audio_seconds, "warmup": warmup, "repeats": repeats, "seconds_median": t,
        "seconds": times, "warmup_seconds": warm, "x_real_time": audio_seconds / t, "rtf": t / audio_seconds,
    }  # fmt: skip


def benchmark_synthesis(
    model: WaveFlow, mel: torch.Tensor, batch: int, sigma: float = 1.0, warmup: int = 1, repeats: int = 10,
    sample_rate: int = 22050,
) -> dict:  # fmt: skip
    """:func:`measure_rtf` of synthesising ``mel`` (1, n_mels, F) repeated ``batch`` times (Parakeet: batch 8 of the
    test mels joined and cut to 864 frames, about 10 s)."""
    mels = mel.expand(batch, -1, -1).contiguous()
    audio_seconds = batch * mel.shape[2] * model.hop / sample_rate
    result = measure_rtf(lambda: timed_synthesis(model, mels, sigma)[1], audio_seconds, warmup, repeats)
    return {"batch": batch, "frames": mel.shape[2], **result}


def train(cfg: DictConfig) -> dict:
    """Fit WaveFlow; writes checkpoints, metrics.json and media/ (resynthesised val clip + mel plots)."""
    return fit(cfg).metrics


def _load(cfg: DictConfig, overrides: dict | None = None) -> tuple[WaveFlow, Restored, MelConfig, torch.device]:
    """The checkpoint's model ready for synthesis, what :func:`restore` gave back (config, datamodule), the mel
    front end of its data (checked against the model's hop) and the device."""
    device = resolve_device(cfg.get("device"))
    restored = restore(cfg.ckpt, overrides, app=cfg.app)
    model = prepare_for_inference(restored.module.eval_model, device, _dtype(cfg.get("precision", "auto"), device))
    mel_cfg = restored.datamodule.mel_config
    model.check_hop(mel_cfg.hop_length)
    return model, restored, mel_cfg, device


def _read_mel_npy(path: Path, n_mels: int) -> torch.Tensor:
    try:
        mel = np.load(path)
    except Exception as e:
        raise AudioError(f"{path}: cannot read as a .npy array ({type(e).__name__}: {e})") from e
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.ndim == 2 and mel.shape[0] != n_mels and mel.shape[1] == n_mels:
        log.info("%s: mel of shape %s read as (frames, n_mels): transposed", path, mel.shape)
        mel = mel.T
    if mel.ndim != 2 or mel.shape[0] != n_mels or mel.shape[1] == 0:
        raise AudioError(f"{path}: expected a log-mel of shape ({n_mels}, frames), got {mel.shape}")
    if not np.isfinite(mel).all():
        raise AudioError(f"{path}: the mel contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(mel))


def _inputs(path: Path, mel_cfg: MelConfig) -> tuple[list[tuple[str, torch.Tensor, int | None]], list[str]]:
    """(name, mel (n_mels, F), length in samples or None) for a wav, a .npy mel, or a folder of them."""
    melspec = MelSpectrogram(mel_cfg)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".wav", ".npy")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise FileNotFoundError(f"input={path}: no .wav or .npy files in the folder")
    if not path.exists():
        raise FileNotFoundError(f"input={path}: no such file or folder")
    items, bad = [], []
    for f in files:
        name = str(f.relative_to(path).with_suffix("")) if path.is_dir() else f.stem
        try:
            if f.suffix.lower() == ".npy":
                items.append((name, _read_mel_npy(f, mel_cfg.n_mels), None))
            elif f.suffix.lower() == ".wav":
                audio = torch.from_numpy(load_wav(f, mel_cfg.sample_rate))
                items.append((name, melspec(audio), len(audio)))
            else:
                raise AudioError(f"{f}: expected a .wav file or a .npy log-mel")
        except AudioError as e:
            if not path.is_dir():
                raise
            bad.append(str(e))
    if bad:
        log.warning("input=%s: skipped %d of %d files:\n  %s", path, len(bad), len(files), "\n  ".join(bad))
    if not items:
        raise AudioError(f"input={path}: none of the {len(files)} files could be used")
    return items, bad


def synthesize(cfg: DictConfig) -> list[Path]:
    """Waveforms from mels: ``input`` = a wav (resynthesis), a .npy log-mel (n_mels, frames), or a folder of them.
    Writes ``wavs/<name>.wav`` and ``synthesis.json`` (per-file length, seconds, real-time factor)."""
    model, _, mel_cfg, device = _load(cfg, {"data": cfg.get("data")})
    items, bad = _inputs(Path(cfg.input).expanduser(), mel_cfg)
    torch.manual_seed(cfg.seed)
    out, written, rows = Path(cfg.output_dir), [], []
    for name, mel, length in tqdm(items, desc="synthesizing", unit="file"):
        audio, secs = timed_synthesis(model, mel[None].to(device), cfg.sigma, length, cfg.fast)
        path = save_wav(out / "wavs" / f"{name}.wav", audio[0].cpu(), mel_cfg.sample_rate)
        dur = audio.shape[1] / mel_cfg.sample_rate
        written.append(path)
        rows.append({"name": name, "seconds_audio": dur, "seconds_synthesis": secs, "x_real_time": dur / secs})
    total_audio = sum(r["seconds_audio"] for r in rows)
    total_time = sum(r["seconds_synthesis"] for r in rows)
    summary = {
        "files": rows, "skipped": bad, "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "x_real_time": total_audio / total_time, "rtf": total_time / total_audio,
    }  # fmt: skip
    write_json(out / "synthesis.json", summary)
    log.info(
        "wrote %d wavs to %s (%.2fx real time on %s)", len(written), out / "wavs", total_audio / total_time, device
    )
    return written


def evaluate(cfg: DictConfig) -> dict:
    """Test log-likelihood per sample over whole utterances, mel L1 and MCD of resyntheses at ``sigma``, and the
    real-time factor of synthesis measured as Parakeet's benchmark (:func:`benchmark_synthesis`, each batch size on
    its own). Writes metrics.json (naming the test set and its size) and the resyntheses under wavs/."""
    overrides = OmegaConf.to_container(cfg.get("data") or OmegaConf.create({}), resolve=True)
    split = cfg.split
    if cfg.input:  # every utterance of the folder
        overrides = {**overrides, "root": str(cfg.input), "splits_dir": str(cfg.input), "val_size": 0, "test_size": 0}
        split = "train"
    model, restored, mel_cfg, device = _load(cfg, {"data": overrides})
    dm = restored.datamodule
    ds = dm.full_utterances(split, multiple_of=model.height)
    n = min(len(ds), cfg.max_utterances or len(ds))
    if n == 0:
        raise ValueError(f"evaluate: split {split!r} of {dm.root} has no utterances")
    test_set = dm.describe(split) if not cfg.input else f"every utterance of {cfg.input} ({len(ds)})"
    melspec = MelSpectrogram(mel_cfg).to(device)
    # the likelihood in fp32 whatever the synthesis precision
    lp_model = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    torch.manual_seed(cfg.seed)
    per, mels, out = [], [], Path(cfg.output_dir)
    for i in tqdm(range(n), desc="evaluating", unit="utt"):
        item = ds[i]
        x, mel = item["x"][None].to(device), item["context"][None].to(device)
        mels.append(mel)
        with torch.inference_mode():
            ll = float(lp_model.log_prob(x, mel)[0])
        audio, _ = timed_synthesis(model, mel, cfg.sigma, x.shape[1], cfg.fast)
        with torch.inference_mode():
            gen_mel = melspec(audio[0])
        uid = ds.utterances[i].id
        per.append({
            "id": uid, "samples": x.shape[1], "ll_per_sample": ll / x.shape[1],
            "mel_l1": mel_l1(gen_mel.cpu(), mel[0].cpu()),
            "mcd": mel_cepstral_distortion(gen_mel.cpu(), mel[0].cpu(), cfg.mcd_coefficients),
        })  # fmt: skip
        if cfg.save_wavs:
            save_wav(out / "wavs" / f"{Path(uid).name}.wav", audio[0].cpu(), mel_cfg.sample_rate)
    samples = sum(p["samples"] for p in per)
    seconds = samples / mel_cfg.sample_rate
    result = {
        "n_utterances": n,
        "split": split if not cfg.input else str(cfg.input),
        "test_set": test_set + ("" if n == len(ds) else f", the first {n} evaluated"),
        "test_ll_per_sample_nats": sum(p["ll_per_sample"] * p["samples"] for p in per) / samples,
        "mel_l1": sum(p["mel_l1"] for p in per) / n,
        "mcd_db": sum(p["mcd"] for p in per) / n,
        "sigma": cfg.sigma,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "audio_seconds": seconds,
        "global_step": restored.global_step,
    }
    result["test_bits_per_sample"] = nats_to_bits_per_dim(-result["test_ll_per_sample_nats"], 1)
    speed = []
    if cfg.rtf.batch_sizes:  # Parakeet's benchmark: the test mels joined, cut to rtf.frames, each batch size apart
        joined = torch.cat(mels, dim=2)[:, :, : cfg.rtf.frames]
        for b in cfg.rtf.batch_sizes:
            speed.append(benchmark_synthesis(model, joined, int(b), cfg.sigma, cfg.rtf.warmup, cfg.rtf.repeats,
                                             mel_cfg.sample_rate))  # fmt: skip
            result[f"x_real_time_batch{b}"] = speed[-1]["x_real_time"]
    write_json(out / "metrics.json", {**result, "speed": speed, "per_utterance": per})
    print_metrics(f"WaveFlow evaluation ({n} utterances, {seconds:.1f} s of audio)", result, fmt=".6g")
    return result


COMMANDS = {"train": train, "synthesize": synthesize, "evaluate": evaluate}
DESCRIPTIONS = {
    "train": "fit WaveFlow by maximum likelihood (data.root=<LJSpeech folder | wav folder>, experiment=paper)",
    "synthesize": "ckpt=... input=<wav | folder | mel .npy> [sigma=1.0]: wavs/*.wav and synthesis.json",
    "evaluate": "ckpt=... [split=test | input=<wav folder>]: test LL per sample, mel L1, MCD, real-time factor",
}
