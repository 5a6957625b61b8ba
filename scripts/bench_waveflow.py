"""WaveFlow speed: synthesis as a multiple of real time (22,050 Hz) and training step time.

    python -m scripts.bench_waveflow                       # CPU (and the GPU when there is one)
    python -m scripts.bench_waveflow --gpu-seconds 10 --compile --json bench.json

Models are the paper's (h=16, 8 flows x 8 layers) at 64 and 128 residual channels, with random weights (speed
does not depend on them). Synthesis uses the cached row-by-row inverse under ``torch.inference_mode``; one
warm-up call precedes the timed ones. The paper's anchor: 5.91 M parameters, 42.6x real time on a V100 (fp16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from apps.waveflow.commands import prepare_for_inference, timed_synthesis
from apps.waveflow.model import WaveFlow

SR = 22050
HOP = 256


def _model(channels: int) -> WaveFlow:
    torch.manual_seed(0)
    model = WaveFlow(height=16, n_flows=8, n_layers=8, channels=channels)
    with torch.no_grad():  # leave the identity initialisation so the numbers are those of a trained model's maths
        for layer in model.layers:
            layer.net.end.weight.normal_(0, 0.01)
    return model


def bench_synthesis(channels: int, device: str, dtype: torch.dtype, seconds: float, repeats: int, fast: bool = True,
                    compile: bool = False) -> dict:  # fmt: skip
    model = prepare_for_inference(_model(channels), torch.device(device), dtype, compile)
    frames = max(1, round(seconds * SR / HOP))
    mel = torch.randn(1, 80, frames, device=device) - 5.0
    timed_synthesis(model, mel, 1.0, fast=fast)  # warm-up (and compilation) on the timed shape
    times = [timed_synthesis(model, mel, 1.0, fast=fast)[1] for _ in range(repeats)]
    t = statistics.median(times)
    audio = frames * HOP / SR
    return {
        "what": "synthesis" + ("" if fast else " (naive inverse)"), "device": device,
        "dtype": str(dtype).replace("torch.", ""), "channels": channels,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "audio_s": audio, "time_s": t,
        "x_real_time": audio / t, "kHz": frames * HOP / t / 1e3, "compile": compile,
    }  # fmt: skip


def bench_training(channels: int, device: str, batch: int, segment: int, repeats: int, bf16: bool = False) -> dict:
    model = _model(channels).to(device).train()
    opt = torch.optim.Adam(model.parameters(), 2e-4)
    x = 0.1 * torch.randn(batch, segment, device=device)
    mel = torch.randn(batch, 80, segment // HOP + 1, device=device) - 5.0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = -model.log_prob(x, mel).mean() / segment
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {
        "what": f"train step (batch {batch} x {segment})", "device": device,
        "dtype": "bf16-mixed" if bf16 else "float32", "channels": channels,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "time_s": t,
        "kHz": batch * segment / t / 1e3,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-seconds", type=float, default=0.5, help="audio length synthesised on the CPU")
    p.add_argument("--gpu-seconds", type=float, default=5.0, help="audio length synthesised on the GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-half", action="store_true", help="also bf16 synthesis on the CPU (slow on most CPUs)")
    p.add_argument("--naive", action="store_true", help="also time the naive O(h^2) inverse (64 channels, CPU)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the row step (GPU)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        secs = args.cpu_seconds if device == "cpu" else args.gpu_seconds
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
        if device == "cpu" and args.cpu_half:
            dtypes.append(torch.bfloat16)
        for channels in (64, 128):
            for dtype in dtypes:
                rows.append(bench_synthesis(channels, device, dtype, secs, args.repeats))
                Console().print(rows[-1])
            if device == "cuda" and args.compile:
                rows.append(bench_synthesis(channels, device, torch.float16, secs, args.repeats, compile=True))
        if device == "cpu" and args.naive:
            rows.append(bench_synthesis(64, device, torch.float32, args.cpu_seconds / 2, 1, fast=False))
            rows.append(bench_synthesis(64, device, torch.float32, args.cpu_seconds / 2, 1, fast=True))
        if not args.no_train:
            batch = 8 if device == "cuda" else 1
            for channels in (64, 128):
                rows.append(bench_training(channels, device, batch, 16000, args.repeats))
                if device == "cuda":
                    rows.append(bench_training(channels, device, batch, 16000, args.repeats, bf16=True))

    table = Table(title=f"WaveFlow speed (h=16, 8 flows x 8 layers; {torch.get_num_threads()} CPU threads)")
    for col in ("what", "device", "dtype", "channels", "params (M)", "audio (s)", "time (s)", "x real time", "kHz"):
        table.add_column(col, justify="left" if col in ("what", "device", "dtype") else "right")
    for r in rows:
        table.add_row(
            r["what"] + (" +compile" if r.get("compile") else ""), r["device"], r["dtype"], str(r["channels"]),
            f"{r['params_M']:.2f}", f"{r['audio_s']:.2f}" if "audio_s" in r else "-", f"{r['time_s']:.3f}",
            f"{r['x_real_time']:.3f}" if "x_real_time" in r else "-", f"{r['kHz']:.1f}",
        )  # fmt: skip
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
