"""WaveFlow speed: synthesis as a multiple of real time (22,050 Hz) and the training step time.

    python -m scripts.bench_waveflow                                   # CPU (and the GPU when there is one)
    python -m scripts.bench_waveflow --device cpu --threads 2 --port /tmp/WaveFlow --rounds 3
    python -m scripts.bench_waveflow --quick --json bench.json         # toy sizes, a few seconds

Synthesis is timed as Parakeet's WaveFlow benchmark times it (``apps.waveflow.commands.measure_rtf``): a warm-up
call first, then ``--repeats`` timed calls under
``torch.inference_mode``, the median reported; batch 1 and batch 8 are separate rows (``x_realtime`` counts the
audio of the whole batch). Models are the paper's (h=16, 8 flows x 8 layers) at 64 (and 128) residual channels
with random weights (speed does not depend on them), weight norm folded.

``--port PATH`` times the PyTorch port (L0SG/WaveFlow, a checkout at PATH; never vendored here) on the same
machine, in alternating rounds with ours (``--rounds``): the same paper model with its weight norm removed and its
mel projections fused as its README does, ``reverse_fast`` synthesis, and its training step (forward, its loss,
backward, Adam). Rows give the median over rounds, and the ratio to the port.

Training: one step (forward, backward, Adam) at batch 2 x 16,000 samples, steady state after two warm-up steps.

GPU (``--device cuda``): fp32, bf16 and fp16 synthesis, and the CUDA-graph path
(``apps.waveflow.cuda_graph.GraphSynthesizer``: the whole synthesis of one shape captured once, replayed); the row
step runs as the fused Triton kernel (``apps.waveflow.row_triton``) where Triton is installed, and the
``torch-rows`` rows time the torch GEMMs beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from apps.waveflow.commands import measure_rtf, prepare_for_inference, timed_synthesis
from apps.waveflow.model import WaveFlow
from core.benchmark import sync

SR = 22050
HOP = 256


def _randomise_outputs(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Move the zero-initialised output convs off zero, so the timed maths is that of a trained model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.normal_(0, 0.01)


def our_model(channels: int, layers: int = 8, flows: int = 8) -> WaveFlow:
    torch.manual_seed(0)
    model = WaveFlow(height=16, n_flows=flows, n_layers=layers, channels=channels)
    _randomise_outputs(model, (".end.",))
    return model


def port_model(path: Path, channels: int, layers: int = 8, flows: int = 8) -> torch.nn.Module:
    """The port's WaveFlow (bipartite permutation = the paper's, as ours), imported from its checkout."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # the port's own modules import each other by bare name
    from models.waveflow import WaveFlow as PortWaveFlow

    torch.manual_seed(0)
    model = PortWaveFlow(1, 80, channels, 16, flows, layers, 1, bipartize=True)
    _randomise_outputs(model, ("proj_log_s_t",))
    return model


# ---- synthesis ------------------------------------------------------------------------------------------------
def our_synthesis(channels: int, device: str, dtype: torch.dtype, frames: int, batch: int, layers: int = 8,
                  flows: int = 8, row_impl: str = "auto") -> tuple[Callable[[], float], float, dict]:  # fmt: skip
    model = prepare_for_inference(our_model(channels, layers, flows), torch.device(device), dtype)
    model.set_row_impl(row_impl)
    mel = torch.randn(batch, 80, frames, device=device) - 5.0
    audio_s = batch * frames * HOP / SR
    info = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    return (lambda: timed_synthesis(model, mel, 1.0)[1]), audio_s, info


def graph_synthesis(channels: int, dtype: torch.dtype, frames: int, batch: int, layers: int = 8,
                    flows: int = 8, row_impl: str = "auto") -> tuple[Callable[[], float], float, dict]:  # fmt: skip
    from apps.waveflow.cuda_graph import GraphSynthesizer

    model = prepare_for_inference(our_model(channels, layers, flows), torch.device("cuda"), dtype)
    model.set_row_impl(row_impl)
    mel = torch.randn(batch, 80, frames, device="cuda") - 5.0
    synth = GraphSynthesizer(model, batch, frames)

    def run() -> float:
        sync("cuda")
        t0 = time.perf_counter()
        synth(mel)
        sync("cuda")
        return time.perf_counter() - t0

    return run, batch * frames * HOP / SR, {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def port_synthesis(path: Path, channels: int, frames: int, batch: int, layers: int = 8,
                   flows: int = 8) -> tuple[Callable[[], float], float, dict]:  # fmt: skip
    model = port_model(path, channels, layers, flows).eval()
    model.remove_weight_norm()
    model.fuse_conditioning_layers()
    info = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    mel = torch.randn(batch, 80, frames) - 5.0
    with torch.inference_mode():
        samples = model.reverse_fast(mel[:1]).shape[-1]  # it trims the upsampler's tail: fewer samples than F * hop

    def run() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.reverse_fast(mel, 1.0)
            return time.perf_counter() - t0

    return run, batch * samples / SR, info


def profile_synthesis(channels: int, device: str, dtype: torch.dtype, frames: int, batch: int, layers: int = 8,
                      flows: int = 8, top: int = 15) -> list[dict]:  # fmt: skip
    """Where one synthesis spends its time: the ``top`` kernels (or CPU ops) by total self time, with counts, and a
    summary row of all kernels' time beside the call's wall time (kernel time < wall time: launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    model = prepare_for_inference(our_model(channels, layers, flows), torch.device(device), dtype)
    mel = torch.randn(batch, 80, frames, device=device) - 5.0
    timed_synthesis(model, mel, 1.0)  # warm-up: plans, allocator
    on_gpu = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        wall = timed_synthesis(model, mel, 1.0)[1]
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if on_gpu:  # kernels only (CPU-side ops also carry device time of the kernels they launch)
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total_us = sum(getattr(e, attr) for e in events)
    rows = [{"what": "profile", "kernel": "(all kernels)" if on_gpu else "(all ops)",
             "calls": sum(e.count for e in events), "total_ms": total_us / 1e3, "wall_ms": wall * 1e3, "batch": batch,
             "precision": str(dtype)}]  # fmt: skip
    for e in events[:top]:
        t = getattr(e, attr)
        rows.append({"what": "profile", "kernel": e.key[:90], "calls": e.count, "total_ms": t / 1e3,
                     "avg_us": t / max(e.count, 1), "share": t / max(total_us, 1e-9), "batch": batch,
                     "precision": str(dtype)})  # fmt: skip
    return rows


# GPU synthesis rows: precision, "cuda-graph" (one captured graph per shape), "torch-rows" (the row step as torch
# GEMMs instead of the fused Triton kernel of apps.waveflow.row_triton, which "auto" picks on a GPU with Triton)
GPU_SYNTHESIS = ["fp32", "bf16", "fp16", "fp16 torch-rows", "cuda-graph fp16", "cuda-graph fp16 torch-rows",
                 "cuda-graph bf16"]  # fmt: skip


def _synthesis_variant(name: str) -> tuple[bool, torch.dtype, str]:
    """(captured as a CUDA graph, dtype, RowStepper impl) of a synthesis row's name."""
    words = name.split()
    dtype = next({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[w] for w in words
                 if w in ("fp32", "bf16", "fp16"))  # fmt: skip
    return "cuda-graph" in words, dtype, "torch" if "torch-rows" in words else "auto"


# ---- training -------------------------------------------------------------------------------------------------
def our_training(channels: int, device: str, batch: int, segment: int, layers: int = 8, flows: int = 8,
                 bf16: bool = False) -> tuple[Callable[[], float], dict]:  # fmt: skip
    model = our_model(channels, layers, flows).to(device).train()
    opt = torch.optim.Adam(model.parameters(), 2e-4)
    x = 0.1 * torch.randn(batch, segment, device=device)
    mel = torch.randn(batch, 80, segment // HOP + 1, device=device) - 5.0

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = -model.log_prob(x, mel).mean() / segment
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t0

    return run, {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def port_training(path: Path, channels: int, batch: int, segment: int, layers: int = 8,
                  flows: int = 8) -> tuple[Callable[[], float], dict]:  # fmt: skip
    model = port_model(path, channels, layers, flows).train()
    from models.loss import WaveFlowLossDataParallel

    loss_fn = WaveFlowLossDataParallel(1.0)
    opt = torch.optim.Adam(model.parameters(), 2e-4)
    x = 0.1 * torch.randn(batch, segment)
    mel = torch.randn(batch, 80, segment // HOP + 1) - 5.0

    def run() -> float:
        t0 = time.perf_counter()
        loss = loss_fn(model(x, mel))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return run, {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}


# ---- driver ---------------------------------------------------------------------------------------------------
def _alternate(runs: dict[str, Callable[[], float]], warmup: int, repeats: int, rounds: int) -> dict[str, list[float]]:
    """Warm every contender up, then ``rounds`` rounds of ``repeats`` timed calls each, contenders alternating."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] += [run() for _ in range(repeats)]
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="toy sizes (a few seconds on a CPU)")
    p.add_argument("--seconds", type=float, default=None, help="audio per synthesis (default: CPU 2 s, GPU 10 s)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="synthesis batch sizes, one row each")
    p.add_argument("--channels", type=int, nargs="+", default=[64], help="residual channels (paper: 64 and 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (with --port)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--port", type=Path, default=None, help="a checkout of L0SG/WaveFlow to time beside ours (CPU)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-synthesis", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write the rows here (a JSON list)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one synthesis per batch size (GPU: fp16 kernels; CPU: fp32 ops)")  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    layers, flows, segment, train_batch = (2, 2, 2048, 2) if args.quick else (8, 8, 16000, 2)
    seconds = args.seconds or (0.1 if args.quick else (2.0 if device == "cpu" else 10.0))
    frames = max(1, round(seconds * SR / HOP))
    batches = [1, 2] if args.quick else args.batches
    channels_list = [8] if args.quick else args.channels
    repeats = 1 if args.quick else args.repeats
    model_name = f"h=16, {flows} flows x {layers} layers"

    rows = []
    for channels in channels_list:
        if not args.no_synthesis:
            for batch in batches:
                runs, meta = {}, {}
                for prec in GPU_SYNTHESIS if device == "cuda" else ["fp32"]:
                    graph, dtype, row_impl = _synthesis_variant(prec)
                    if graph:
                        runs[prec], audio_s, info = graph_synthesis(channels, dtype, frames, batch, layers, flows,
                                                                    row_impl)  # fmt: skip
                    else:
                        runs[prec], audio_s, info = our_synthesis(channels, device, dtype, frames, batch, layers, flows,
                                                                  row_impl)  # fmt: skip
                    meta[prec] = (audio_s, info, "flowsuite")
                if args.port is not None and device == "cpu":
                    runs["port fp32"], audio_s, info = port_synthesis(args.port, channels, frames, batch, layers, flows)
                    meta["port fp32"] = (audio_s, info, "L0SG/WaveFlow")
                if args.port is None:  # one contender at a time: measure_rtf is the routine evaluate uses
                    times = {
                        k: measure_rtf(run, meta[k][0], args.warmup, repeats)["seconds"] for k, run in runs.items()
                    }
                else:
                    times = _alternate(runs, args.warmup, repeats, args.rounds)
                for prec, ts in times.items():
                    audio_s, info, impl = meta[prec]
                    t = statistics.median(ts)
                    rows.append({
                        "what": "synthesis", "impl": impl, "device": device, "precision": prec, "channels": channels,
                        "batch": batch, "model": model_name, "params_M": info["params_M"], "audio_s": audio_s,
                        "time_s": t, "times_s": ts, "x_realtime": audio_s / t,
                    })  # fmt: skip
                    Console().print({k: v for k, v in rows[-1].items() if k != "times_s"})
                if "port fp32" in times:
                    ours = next(r for r in rows[-len(times) :] if r["precision"] == "fp32")
                    port = rows[-1]
                    ours["vs_port"] = ours["x_realtime"] / port["x_realtime"]
        if not args.no_train:
            runs, meta = {}, {}
            runs["fp32"], meta["fp32"] = our_training(channels, device, train_batch, segment, layers, flows)
            if device == "cuda":
                runs["bf16-mixed"], meta["bf16-mixed"] = our_training(channels, device, train_batch, segment, layers,
                                                                      flows, bf16=True)  # fmt: skip
            if args.port is not None and device == "cpu":
                runs["port fp32"], meta["port fp32"] = port_training(args.port, channels, train_batch, segment, layers,
                                                                     flows)  # fmt: skip
            times = _alternate(runs, 1 if args.quick else 2, repeats, args.rounds)
            for prec, ts in times.items():
                t = statistics.median(ts)
                rows.append({
                    "what": f"train step (batch {train_batch} x {segment})", "device": device, "precision": prec,
                    "impl": "L0SG/WaveFlow" if prec.startswith("port") else "flowsuite", "channels": channels,
                    "batch": train_batch, "model": model_name, "params_M": meta[prec]["params_M"], "time_s": t,
                    "times_s": ts, "kHz": train_batch * segment / t / 1e3,
                })  # fmt: skip
            if "port fp32" in times:
                ours = next(r for r in rows[-len(times) :] if r["precision"] == "fp32")
                ours["vs_port"] = ours["time_s"] / rows[-1]["time_s"]

    title = (f"WaveFlow speed ({model_name}; {device}, {torch.get_num_threads()} CPU threads; "
             f"median of {repeats} x {args.rounds} timed calls after {args.warmup} warm-up)")  # fmt: skip
    table = Table(title=title)
    cols = ("what", "impl", "precision", "channels", "batch", "params (M)", "audio (s)", "time (s)", "x real time",
            "vs port")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("what", "impl", "precision") else "right")
    for r in rows:
        table.add_row(
            r["what"], r["impl"], r["precision"], str(r["channels"]), str(r["batch"]), f"{r['params_M']:.2f}",
            f"{r['audio_s']:.2f}" if "audio_s" in r else "-", f"{r['time_s']:.3f}",
            f"{r['x_realtime']:.3f}" if "x_realtime" in r else "-",
            f"{r['vs_port']:.2f}x" if "vs_port" in r else "-",
        )  # fmt: skip
    Console(width=180).print(table)
    if args.profile:
        for batch in batches:
            dtype = torch.float16 if device == "cuda" else torch.float32
            prof = profile_synthesis(channels_list[0], device, dtype, frames, batch, layers, flows)
            ptable = Table(title=f"Profile of one synthesis, {prof[0]['precision']}, batch {batch}, "
                                 f"{channels_list[0]} channels: wall {prof[0]['wall_ms']:.1f} ms")  # fmt: skip
            for col in ("kernel" if device == "cuda" else "op", "calls", "total (ms)", "avg (us)", "share"):
                ptable.add_column(col, justify="left" if col in ("kernel", "op") else "right")
            for r in prof:
                ptable.add_row(r["kernel"], str(r["calls"]), f"{r['total_ms']:.2f}",
                               f"{r['avg_us']:.1f}" if "avg_us" in r else "-",
                               f"{100 * r['share']:.1f} %" if "share" in r else "-")  # fmt: skip
            Console(width=180).print(ptable)
            rows += prof
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
