"""VideoFlow benchmark: generation frames/s at 64 x 64 (the paper model), training step time and peak memory.

    python -m scripts.bench_videoflow                  # CPU: paper (generation), small and small-light (both rows)
    python -m scripts.bench_videoflow --device cuda         # GPU: every model, float32 and bf16 autocast
    python -m scripts.bench_videoflow --quick --json rows.json

Rows: generation of ``--steps`` future frames from 3 context frames at temperature 1 (batch 1: latency; batch
``--gen-batch``: throughput), and one training step (NLL of the target frames, forward + backward + Adam) on clips
of ``--frames`` frames (3 context + 1 target, as the paper's 4-frame training crops); ``seconds`` per call and
``frames_per_s`` (frames generated, or frames of the training batch, per second).
Models: ``paper`` is experiment=paper (L = 3 levels of 24 steps, coupling width 512, the conv3d prior: 5 blocks of
width 256, gated, dilated; 8-bit), ``small`` the CPU default config (conf/videoflow/model/videoflow.yaml), and
``small-light`` the same with ``model.prior=light``. The paper's claim (Kumar et al. 2020): about 20
frames of 64 x 64 in under 3.5 s on a P100 (about 5.7 frames/s); it reports 1.87 bits per pixel on BAIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from apps.videoflow.model import VideoFlowModel
from core.benchmark import peak_memory_mb, sync

MODELS = {  # conf/videoflow/model/videoflow.yaml and conf/videoflow/experiment/paper.yaml
    "small": dict(steps=4, hidden=32, prior="conv3d", prior_hidden=32, prior_blocks=2),
    "small-light": dict(steps=4, hidden=32, prior="light", prior_hidden=32, prior_blocks=2),
    "paper": dict(steps=24, hidden=512, prior="conv3d", prior_hidden=256, prior_blocks=5),
}
PAPER_FPS = 20 / 3.5  # "20 frames in under 3.5 s" on a P100


def build(name: str, channels: int, size: int, levels: int, device: str) -> VideoFlowModel:
    model = VideoFlowModel(channels, size, bits=8, levels=levels, context_frames=3, num_cond=3, **MODELS[name])
    model.to(device).train()
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        model.log_prob(torch.randint(0, 256, (2, 4, channels, size, size), dtype=torch.uint8, device=device))
    return model


def autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_train(model: VideoFlowModel, batch: int, frames: int, device: str, repeats: int, dtype: str) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (batch, frames, model.channels, model.size, model.size), dtype=torch.uint8, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = -model.log_prob(x).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    times = times[1:]
    return {"step_s": sorted(times)[len(times) // 2], "peak_mb": peak_memory_mb(device)}


@torch.no_grad()
def bench_generate(model: VideoFlowModel, batch: int, steps: int, device: str, dtype: str) -> float:
    model.eval()
    ctx = torch.randint(0, 256, (batch, 3, model.channels, model.size, model.size), dtype=torch.uint8, device=device)
    with autocast(device, dtype):
        model.predict(ctx, 1, 1.0)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.predict(ctx, steps, 1.0)
        sync(device)
    model.train()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present, else CPU")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="default: all (see the module doc)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="clips per training step (default 5 GPU, 2 CPU)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="frames generated per context")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-paper", action="store_true", help="on CPU also time the paper model's training step")
    ap.add_argument(
        "--dtypes", nargs="+", choices=["fp32", "bf16"], default=None, help="default: fp32 (CPU), both (GPU)"
    )
    ap.add_argument("--quick", action="store_true", help="toy sizes: 16 x 16, L = 2, the small models, a few seconds")
    ap.add_argument("--json", default=None, help="also write the rows as a JSON list of objects")
    args = ap.parse_args()
    if args.quick:
        args.size, args.levels, args.steps, args.gen_batch, args.repeats = 16, 2, 2, 2, 1
        args.models = args.models or ["small", "small-light"]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    names = args.models or ["paper", "small", "small-light"]
    dtypes = args.dtypes or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build(name, args.channels, args.size, args.levels, device)
        head = {"device": device, "model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        batch = args.batch or (5 if device == "cuda" else 2)
        for dtype in dtypes:
            for b in (1, args.gen_batch):
                fps = bench_generate(model, b, args.steps, device, dtype)
                rows.append(
                    {
                        **head,
                        "dtype": dtype,
                        "what": f"generation b={b}",
                        "batch": b,
                        "seconds": round(b * args.steps / fps, 3),
                        "frames_per_s": round(fps, 2),
                        "peak_mb": None,
                    }
                )
            if device == "cuda" or name != "paper" or args.train_paper:
                tr = bench_train(model, batch, args.frames, device, args.repeats, dtype)
                rows.append(
                    {
                        **head,
                        "dtype": dtype,
                        "what": "train step",
                        "batch": batch,
                        "seconds": round(tr["step_s"], 4),
                        "frames_per_s": round(batch * args.frames / tr["step_s"], 2),
                        "peak_mb": round(tr["peak_mb"]),
                    }
                )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(
        f"\nVideoFlow benchmark, {args.size}x{args.size}x{args.channels}, L={args.levels}, training clips of "
        f"{args.frames} frames, generation at temperature 1 (torch {torch.__version__}, {torch.get_num_threads()} "
        f"CPU threads, GPU: {gpu})"
    )
    cols = list(rows[0]) if rows else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    print("(CPU peak memory is the process's max RSS; GPU the peak allocated tensor memory.)")
    print(
        f"Paper anchor: about 20 frames in under 3.5 s on a P100 ({PAPER_FPS:.1f} frames/s); 1.87 bits/pixel on BAIR."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
