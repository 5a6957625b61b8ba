"""Benchmark the core flows against zuko's equivalents: throughput, forward+backward time, peak memory.

    python -m scripts.bench_core                 # CPU (and CUDA when present), quick sizes
    python -m scripts.bench_core --device cuda --full --json bench.json

For each case: samples/s of ``log_prob`` and of ``sample`` (no grad), milliseconds for one
``-log_prob(x).mean()`` forward+backward, and peak memory of that step (CUDA: ``max_memory_allocated``; CPU: the
growth of the process's peak RSS during the first step, measured in a fresh process per case). Where zuko has the
same architecture (RealNVP, MAF, FFJORD CNF) it is measured the same way and the ratio printed.

Architectures compared: RealNVP = alternating-mask affine couplings, MLP (64, 64), no ActNorm, 5 layers; MAF =
5 MADE (64, 64) layers with reversed orders; CNF = one FFJORD block, dopri5, atol 1e-6, rtol 1e-5, end time 1.
Differences kept: our CNF uses ConcatSquash layers (PointFlow's) and torchdiffeq; zuko's uses an MLP with a
sinusoidal time embedding and its own solver. zuko (``pip install zuko``, the ``bench`` extra) is optional.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    flow: str
    features: int | tuple[int, int, int]
    batch: int
    trace: str = "exact"


QUICK = [
    Case("realnvp", 8, 1024),
    Case("realnvp", 64, 1024),
    Case("maf", 8, 1024),
    Case("maf", 64, 1024),
    Case("glow_step", (12, 16, 16), 32),
    Case("glow", (3, 32, 32), 16),
    Case("cnf", 2, 512, "exact"),
    Case("cnf", 16, 512, "hutchinson"),
]
FULL = QUICK + [
    Case("realnvp", 256, 4096),
    Case("maf", 256, 1024),
    Case("glow_step", (48, 32, 32), 64),
    Case("glow", (3, 64, 64), 32),
    Case("cnf", 64, 1024, "hutchinson"),
]


def _build(case: Case, lib: str):
    """(log_prob(x), sample(n), parameters) callables for one library, or None if it has no equivalent."""

    if lib == "zuko":
        import zuko

        d = case.features
        if case.flow == "realnvp":
            flow = zuko.flows.RealNVP(d, transforms=5, hidden_features=(64, 64))
        elif case.flow == "maf":
            flow = zuko.flows.MAF(d, transforms=5, hidden_features=(64, 64))
        elif case.flow == "cnf":
            flow = zuko.flows.CNF(d, hidden_features=(64, 64), exact=case.trace == "exact", atol=1e-6, rtol=1e-5)
        else:
            return None
        return (lambda x: flow().log_prob(x)), (lambda n: flow().sample((n,))), flow

    from core import presets
    from core.distributions import FlowModel, StandardNormal
    from core.flows import GlowStep

    if case.flow == "realnvp":
        model = presets.realnvp(case.features, transforms=5, hidden=(64, 64), actnorm=False)
    elif case.flow == "maf":
        model = presets.maf(case.features, transforms=5, hidden=(64, 64))
    elif case.flow == "cnf":
        model = presets.cnf(
            case.features, hidden=(64, 64), trace=case.trace, atol=1e-6, rtol=1e-5, end_time=1.0, act="softplus"
        )
    elif case.flow == "glow_step":
        model = FlowModel(GlowStep(case.features[0], hidden=128), StandardNormal(case.features))
    elif case.flow == "glow":
        model = presets.glow(case.features, levels=3, steps=4, hidden=128)
    else:
        raise ValueError(case.flow)
    return model.log_prob, (lambda n: model.sample(n)), model


def _timeit(fn, device, min_time: float, max_iter: int = 200) -> float:
    """Median seconds per call after one warm-up call."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < max_iter and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(case: Case, lib: str, device: str, min_time: float) -> dict | None:
    import torch

    torch.manual_seed(0)
    built = _build(case, lib)
    if built is None:
        return None
    log_prob, sample, module = built
    module.to(device)
    shape = (case.features,) if isinstance(case.features, int) else case.features
    x = torch.randn(case.batch, *shape, device=device)
    if lib == "ours":
        module.train()
        module.log_prob(x)  # ActNorm initialisation
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        (-log_prob(x).mean()).backward()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = _rss_mb()
        step()
        peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
    t_step = _timeit(step, device, min_time)
    module.eval()
    with torch.no_grad():
        t_lp = _timeit(lambda: log_prob(x), device, min_time)
        n_sample = case.batch
        t_s = _timeit(lambda: sample(n_sample), device, min_time, max_iter=20)
    return {
        "flow": case.flow,
        "lib": lib,
        "size": "x".join(map(str, shape)),
        "batch": case.batch,
        "trace": case.trace if case.flow == "cnf" else "",
        "device": device,
        "log_prob_per_s": case.batch / t_lp,
        "sample_per_s": n_sample / t_s,
        "fwd_bwd_ms": 1000 * t_step,
        "peak_mb": peak,
        "params": sum(p.numel() for p in params),
    }


def _child(args):
    case, lib, device, min_time = args
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return measure(case, lib, device, min_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--full", action="store_true", help="add larger sizes")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    ap.add_argument("--only", default="", help="comma-separated flow names to run (realnvp,maf,glow_step,glow,cnf)")
    ap.add_argument("--no-zuko", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args()

    import torch

    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else [args.device]
    devices = ["cpu"] if devices == ["auto"] else devices
    libs = ["ours"]
    if not args.no_zuko:
        try:
            import zuko  # noqa: F401

            libs.append("zuko")
        except ImportError:
            print("zuko is not installed (pip install zuko): measuring flowsuite only", file=sys.stderr)
    cases = FULL if args.full else QUICK
    if args.only:
        cases = [c for c in cases if c.flow in args.only.split(",")]
    ctx = mp.get_context("spawn")  # a fresh process per measurement: clean peak memory, no shared caches
    rows = []
    for device in devices:
        for case in cases:
            for lib in libs:
                with ctx.Pool(1) as pool:
                    row = pool.apply(_child, ((case, lib, device, args.min_time),))
                if row is not None:
                    rows.append(row)
                    print(f"  {device} {case.flow} {row['size']} {lib}: {row['fwd_bwd_ms']:.2f} ms", file=sys.stderr)
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"core flows (torch threads: {os.cpu_count()})")
    for col in (
        "device",
        "flow",
        "size",
        "batch",
        "lib",
        "log_prob/s",
        "sample/s",
        "fwd+bwd ms",
        "peak MB",
        "params",
        "zuko/ours fwd+bwd",
    ):
        table.add_column(col, justify="right" if col not in ("device", "flow", "lib") else "left")
    ref = {(r["device"], r["flow"], r["size"], r["trace"]): r for r in rows if r["lib"] == "zuko"}
    for r in rows:
        z = ref.get((r["device"], r["flow"], r["size"], r["trace"]))
        ratio = f"{z['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if z and r["lib"] == "ours" else ""
        flow = r["flow"] + (f" ({r['trace']})" if r["trace"] else "")
        table.add_row(
            r["device"],
            flow,
            r["size"],
            str(r["batch"]),
            r["lib"],
            f"{r['log_prob_per_s']:,.0f}",
            f"{r['sample_per_s']:,.0f}",
            f"{r['fwd_bwd_ms']:.2f}",
            f"{r['peak_mb']:.1f}",
            f"{r['params']:,}",
            ratio,
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
