"""VideoFlow benchmark: training step time and peak memory, and generation frames/s at 64 x 64, CPU and GPU.

    python -m scripts.bench_videoflow                          # CPU: the default (small) model; GPU if present: both
    python -m scripts.bench_videoflow --device cuda --model paper --batch 5 --frames 4

Rows: one training step (NLL of the target frames, forward + backward + Adam) on clips of ``--frames`` frames
(3 context + 1 target, as the paper's 4-frame training crops), and generation of ``--steps`` future frames from
3 context frames (batch 1: latency; batch ``--gen-batch``: throughput), in frames per second.
VideoFlow (Kumar et al. 2020) reports 1.87 bits per pixel on BAIR and real-time 64 x 64 generation on a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from apps.videoflow.model import VideoFlowModel  # noqa: E402
from core.benchmark import peak_memory_mb, sync

SIZES = {  # conf/videoflow/model/videoflow.yaml and experiment=paper
    "small": dict(steps=4, hidden=32, prior_hidden=32, prior_blocks=1, bits=5),
    "paper": dict(steps=24, hidden=512, prior_hidden=256, prior_blocks=5, bits=8),
}


def build(size_name: str, channels: int, size: int, device: str) -> VideoFlowModel:
    model = VideoFlowModel(channels=channels, size=size, levels=3, context_frames=3, num_cond=3, **SIZES[size_name])
    model.to(device).train()
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        model.log_prob(torch.randint(0, 256, (2, 4, channels, size, size), dtype=torch.uint8, device=device))
    return model


def bench_train(model: VideoFlowModel, batch: int, frames: int, device: str, repeats: int) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (batch, frames, model.channels, model.size, model.size), dtype=torch.uint8, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        sync(device)
        t0 = time.perf_counter()
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    times = times[1:]
    return {"step_s": sorted(times)[len(times) // 2], "peak_mb": peak_memory_mb(device)}


@torch.no_grad()
def bench_generate(model: VideoFlowModel, batch: int, steps: int, device: str) -> float:
    model.eval()
    ctx = torch.randint(0, 256, (batch, 3, model.channels, model.size, model.size), dtype=torch.uint8, device=device)
    model.predict(ctx, 2, 0.7)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.predict(ctx, steps, 0.7)
    sync(device)
    model.train()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, and CUDA if present")
    ap.add_argument(
        "--model", choices=["auto", "small", "paper"], default="auto", help="auto: small on CPU, both on GPU"
    )
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="clips per training step (default 5 GPU, 2 CPU)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="frames generated per context")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    devices = [args.device] if args.device != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        names = [args.model] if args.model != "auto" else (["small"] if device == "cpu" else ["small", "paper"])
        for name in names:
            torch.manual_seed(0)
            model = build(name, args.channels, args.size, device)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            batch = args.batch or (5 if device == "cuda" else 2)
            tr = bench_train(model, batch, args.frames, device, args.repeats)
            fps1 = bench_generate(model, 1, args.steps, device)
            fpsb = bench_generate(model, args.gen_batch, args.steps, device)
            rows.append((device, name, params, batch, tr["step_s"], tr["peak_mb"], fps1, fpsb))
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(
        f"\nVideoFlow benchmark, {args.size}x{args.size}x{args.channels}, L=3, training clips of {args.frames} frames "
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads, GPU: {gpu})"
    )
    head = "| device | model | params (M) | train batch | step (s) | peak mem (MB) | gen fps (b=1) | "
    head += f"gen fps (b={args.gen_batch}) |"
    print(head)
    print("|" + "---|" * 8)
    for d, n, p, b, s, m, f1, fb in rows:
        print(f"| {d} | {n} | {p:.2f} | {b} | {s:.3f} | {m:.0f} | {f1:.1f} | {fb:.1f} |")
    print("(CPU peak memory is the process's max RSS; GPU the peak allocated tensor memory.)")
    print("Paper anchors: 1.87 bits per pixel on BAIR (8-bit); generation fast enough for real-time use on a GPU.")


if __name__ == "__main__":
    main()
