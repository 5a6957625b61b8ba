"""PointFlow benchmark: training step, sampling, and evaluation-metric cost, on CPU and (when present) GPU.

    python -m scripts.bench_pointflow                       # CPU: small model, GPU (if any): the paper's model
    python -m scripts.bench_pointflow --model paper --batch 16 --points 2048 --device cuda
    python -m scripts.bench_pointflow --eval-shapes 405     # 1-NNA-CD on 405 x 405 shapes (ShapeNet airplane test size)

Rows: one training step (negative ELBO forward + backward, adjoint, Hutchinson trace) with its peak memory and
the number of ODE-function evaluations; sampling time per shape (latent CNF + point CNF); the time of the pairwise
distance matrices that MMD/COV/1-NNA need for an S x S evaluation, in Chamfer and EMD (exact and Sinkhorn).
"""

from __future__ import annotations

import argparse
import time

import torch

from apps.pointflow import metrics as M  # noqa: E402
from apps.pointflow.model import PointFlowModel  # noqa: E402
from core.benchmark import peak_memory_mb, sync
from core.flows import CNF  # noqa: E402

SIZES = {
    "small": dict(point_hidden=(64, 64, 64), latent_hidden=(64, 64)),  # conf/pointflow/model/pointflow.yaml
    "paper": dict(point_hidden=(512, 512, 512), latent_hidden=(256, 256)),  # experiment=paper
}


def bench_train(model: PointFlowModel, batch: int, points: int, device: str, repeats: int) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, points, 3, device=device) * 0.5
    cnfs = [m for m in model.modules() if isinstance(m, CNF)]
    times, nfe = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats + 1):  # the first step warms up (cuDNN, allocator)
        for c in cnfs:
            c.func.num_evals = 0
        sync(device)
        t0 = time.perf_counter()
        terms = model.elbo_terms(x)
        loss = (terms["recon"] + terms["prior"] - terms["entropy"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        nfe.append(sum(c.func.num_evals for c in cnfs))
    times, nfe = times[1:] or times, nfe[1:] or nfe
    return {"step_s": sorted(times)[len(times) // 2], "nfe": sum(nfe) / len(nfe), "peak_mb": peak_memory_mb(device)}


@torch.no_grad()
def bench_sample(model: PointFlowModel, n: int, points: int, device: str) -> float:
    model.eval()
    model.sample(2, points)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.sample(n, points)
    sync(device)
    model.train()
    return (time.perf_counter() - t0) / n


def bench_metrics(shapes: int, points: int, device: str, emd: bool) -> dict:
    """Seconds for the three S x S distance matrices of 1-NNA. CD is timed in full; EMD (seconds per pair on a
    CPU) is timed on a 4 x 4 block and extrapolated to the S^2/2 + S^2 + S^2/2 pairs, reported as such."""
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(shapes, points, 3, generator=g) - 0.5).to(device)
    b = (torch.rand(shapes, points, 3, generator=g) - 0.5).to(device)
    pairs = 2 * shapes * shapes  # a-a and b-b are symmetric (half each), a-b is full
    out = {}
    sync(device)
    t0 = time.perf_counter()
    for x, y in ((a, a), (a, b), (b, b)):
        M.pairwise_distances(x, y, metric="cd")
    sync(device)
    out["cd"] = (time.perf_counter() - t0, False)
    for metric in ["emd_sinkhorn", "emd_exact"] if emd else []:
        k = min(4, shapes)
        sync(device)
        t0 = time.perf_counter()
        M.pairwise_distances(a[:k], b[:k], metric=metric)
        sync(device)
        out[metric] = ((time.perf_counter() - t0) / (k * k) * pairs, True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument(
        "--model", choices=["auto", "small", "paper"], default="auto", help="auto: small on CPU, paper on GPU"
    )
    ap.add_argument("--batch", type=int, default=None, help="shapes per training step (default 16 GPU, 4 CPU)")
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sample-shapes", type=int, default=4)
    ap.add_argument("--eval-shapes", type=int, default=100)
    ap.add_argument(
        "--eval-points", type=int, default=None, help="points per shape in the metric bench (default --points)"
    )
    ap.add_argument("--no-emd", action="store_true")
    args = ap.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.model if args.model != "auto" else ("paper" if device == "cuda" else "small")
    batch = args.batch or (16 if device == "cuda" else 4)
    torch.manual_seed(0)
    model = PointFlowModel(**SIZES[size]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"device {device}, model {size} ({n_params:,} parameters), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    tr = bench_train(model, batch, args.points, device, args.repeats)
    per_shape = bench_sample(model, args.sample_shapes, args.points, device)
    ev = bench_metrics(args.eval_shapes, args.eval_points or args.points, device, not args.no_emd)

    from rich.console import Console
    from rich.table import Table

    table = Table(title="PointFlow benchmark")
    table.add_column("what")
    table.add_column("setting")
    table.add_column("result", justify="right")
    table.add_row("train step", f"{size}, batch {batch} x {args.points} pts", f"{tr['step_s']:.2f} s")
    table.add_row("  ODE evaluations / step", "fwd + adjoint, both CNFs", f"{tr['nfe']:.0f}")
    table.add_row(
        "  peak memory", "CUDA allocated" if device == "cuda" else "process peak RSS", f"{tr['peak_mb']:.0f} MB"
    )
    table.add_row("sampling", f"{args.points} pts per shape", f"{per_shape:.3f} s / shape")
    for metric, (t, extrapolated) in ev.items():
        shown = f"{t:.1f} s" + (" (extrapolated from 16 pairs)" if extrapolated else "")
        table.add_row(f"1-NNA matrices, {metric}", f"{args.eval_shapes} x {args.eval_shapes} shapes", shown)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
