"""PointFlow benchmark: metric kernels (Chamfer, approxmatch / exact / Sinkhorn EMD), the 1-NNA matrices, a training
step and sampling, on CPU or GPU. One table; ``--json`` writes its rows.

    python -m scripts.bench_pointflow                      # CPU: 2,048-point pairs, 100 x 100 1-NNA, small model
    python -m scripts.bench_pointflow --quick              # toy sizes, a few seconds
    python -m scripts.bench_pointflow --device cuda --eval-shapes 405 --model paper   # full 405 x 405 1-NNA
    python -m scripts.bench_pointflow --versus-only --reference ../PointFlow --reference-torchdiffeq /tmp/tdq001

With ``--reference <checkout of stevenygd/PointFlow>`` a second table puts flowsuite's training step and sampling
beside the reference's (its own code, imported from that checkout in separate processes, on the torchdiffeq that
``--reference-torchdiffeq`` names, e.g. ``pip install --no-deps --target DIR torchdiffeq==0.0.1`` as it pins):
random weights, fresh processes alternating between the two, medians, function evaluations counted from outside.

Timings alternate between the implementations compared (round robin) and report medians, so that a machine
shared with other jobs slows them alike. On a CPU the EMD rows of the 1-NNA matrices are extrapolated from a block
of pairs (and marked so); on a GPU they are computed in full.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from apps.pointflow import approxmatch_triton
from apps.pointflow import metrics as M
from apps.pointflow.model import PointFlowModel
from core.benchmark import peak_memory_mb, sync
from core.flows import CNF

SIZES = {
    "small": dict(point_hidden=(64, 64, 64), latent_hidden=(64, 64)),  # conf/pointflow/model/pointflow.yaml
    "paper": dict(point_hidden=(512, 512, 512), latent_hidden=(256, 256)),  # experiment=paper
    "tiny": dict(zdim=16, point_hidden=(16, 16), latent_hidden=(16, 16)),  # --quick
}


def _alternate(runs: dict[str, Callable[[], object]], device: str, rounds: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each run, ``rounds`` times in round-robin order, after one warm-up call each."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _chamfer_direct(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Chamfer distance as computed before (cdist on differences, no matrix product): the baseline."""
    d2 = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square_()
    return d2.amin(2).mean(1) + d2.amin(1).mean(1)


def bench_pairs(pairs: int, points: int, device: str, rounds: int, emd: bool) -> list[dict]:
    """Milliseconds per pair of ``points``-point clouds, ``pairs`` pairs per batched call."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(pairs, points, 3, generator=g) - 0.5).to(device)
    y = (torch.rand(pairs, points, 3, generator=g) - 0.5).to(device)
    cd = {
        "direct (cdist, before)": lambda: _chamfer_direct(x, y),
        "matmul": lambda: M.chamfer_distance(x, y, "matmul"),
    }
    if device == "cpu":
        cd["kdtree"] = lambda: M.chamfer_distance(x, y, "kdtree")
    rows = []
    base = _chamfer_direct(x.double(), y.double())
    times = _alternate(cd, device, rounds)
    for name, ts in times.items():
        err = (cd[name]().double() - base).abs().max().item()
        rows.append(dict(what="Chamfer per pair", impl=name, setting=f"{pairs} pairs x {points} pts",
                         ms=1e3 * statistics.median(ts) / pairs, note=f"max |diff| {err:.1e}"))  # fmt: skip
    ref = rows[0]["ms"]
    for r in rows[1:]:
        r["speedup"] = ref / r["ms"]
    if emd:
        k = 2 if device == "cpu" else pairs  # the exact EMD is one CPU solve per pair
        runs = {
            "approxmatch": lambda: M.emd_approxmatch(x, y, impl="torch"),
            "exact (Hungarian)": lambda: M.emd_exact(x[:k], y[:k]),
        }
        if device == "cuda" and approxmatch_triton.available(x.device):
            runs["approxmatch (triton)"] = lambda: M.emd_approxmatch(x, y, impl="triton")
        times = _alternate(runs, device, max(1, rounds // 2))
        exact = M.emd_exact(x[:k], y[:k])
        ratio = (M.emd_approxmatch(x[:k], y[:k]) / exact).mean().item()
        for name, ts in times.items():
            n = k if name.startswith("exact") else pairs
            note = f"{ratio:.2f}x the exact EMD (independent uniform cubes)" if name == "approxmatch" else ""
            if name == "approxmatch (triton)":
                diff = M.emd_approxmatch(x, y, impl="triton") / M.emd_approxmatch(x, y, impl="torch") - 1
                note = f"max rel. diff to torch {diff.abs().max().item():.1e}"
            rows.append(dict(what="EMD per pair", impl=name, setting=f"{n} pairs x {points} pts",
                             ms=1e3 * statistics.median(ts) / n, note=note))  # fmt: skip
        sk = 1 if device == "cpu" else pairs
        t0 = time.perf_counter()
        M.emd_sinkhorn(x[:sk], y[:sk])
        sync(device)
        rows.append(dict(what="EMD per pair", impl="sinkhorn", setting=f"{sk} pairs x {points} pts",
                         ms=1e3 * (time.perf_counter() - t0) / sk, note="one call"))  # fmt: skip
    return rows


def bench_one_nna(shapes: int, points: int, device: str, emd: bool, block: int) -> list[dict]:
    """Seconds for the three matrices of 1-NNA (and MMD/COV) on ``shapes`` x ``shapes`` clouds: Chamfer in full;
    approxmatch in full on a GPU, else from a ``block`` x ``block`` block (S*R + S^2 + R^2 pairs, not symmetric)."""
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(shapes, points, 3, generator=g) - 0.5).to(device)
    b = (torch.rand(shapes, points, 3, generator=g) - 0.5).to(device)
    rows = []
    sync(device)
    t0 = time.perf_counter()
    for x, y in ((a, a), (a, b), (b, b)):
        M.pairwise_distances(x, y, metric="cd")
    sync(device)
    impl = "kdtree" if device == "cpu" else "matmul"
    rows.append(dict(what="1-NNA matrices", impl=f"CD ({impl})", setting=f"{shapes} x {shapes} shapes, {points} pts",
                     s=time.perf_counter() - t0, note="full"))  # fmt: skip
    if emd:
        total = 3 * shapes * shapes
        fused = device == "cuda" and approxmatch_triton.available(a.device)
        impl = "triton" if fused else "torch"
        # in full where it is fast (the fused kernels on a GPU), else extrapolated from a block
        k = shapes if fused else min(block, shapes)
        if fused:  # compile and tune first, on a full chunk of pairs: the timing is what a long evaluation sees
            M.pairwise_distances(a[:64], b[:64], metric="emd_approxmatch")
        sync(device)
        t0 = time.perf_counter()
        if k == shapes:
            for x, y in ((a, a), (a, b), (b, b)):
                M.pairwise_distances(x, y, metric="emd_approxmatch")
            sync(device)
            t, note = time.perf_counter() - t0, "full"
        else:
            M.pairwise_distances(a[:k], b[:k], metric="emd_approxmatch")
            sync(device)
            t, note = (time.perf_counter() - t0) / (k * k) * total, f"extrapolated from {k * k} pairs"
        rows.append(dict(what="1-NNA matrices", impl=f"EMD (approxmatch, {impl})",
                         setting=f"{shapes} x {shapes} shapes, {points} pts", s=t, note=note))  # fmt: skip
    return rows


def _nfe(cnfs: Sequence[CNF]) -> int:
    return sum(c.func.num_evals for c in cnfs)


def bench_model(size: str, batch: int, points: int, sample_shapes: int, device: str, repeats: int) -> list[dict]:
    """One training step (negative ELBO, forward + adjoint backward, Hutchinson trace) and sampling, with NFE."""
    torch.manual_seed(0)
    model = PointFlowModel(**SIZES[size]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, points, 3, device=device) * 0.5
    point_cnfs = [m for m in model.point_flow.modules() if isinstance(m, CNF)]
    latent_cnfs = [m for m in model.latent.modules() if isinstance(m, CNF)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, nfe = [], []
    for _ in range(repeats + 1):  # the first step warms up
        for c in point_cnfs + latent_cnfs:
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
        nfe.append(_nfe(point_cnfs + latent_cnfs))
    setting = f"{size}, batch {batch} x {points} pts"
    rows = [dict(what="train step", impl="flowsuite", setting=setting, s=statistics.median(times[1:]),
                 nfe=statistics.median(nfe[1:]), peak_mb=peak_memory_mb(device))]  # fmt: skip
    model.eval()
    with torch.no_grad():
        model.sample(1, points)
        for c in point_cnfs + latent_cnfs:
            c.func.num_evals = 0
        sync(device)
        t0 = time.perf_counter()
        model.sample(sample_shapes, points)
        sync(device)
    rows.append(dict(what="sampling per shape", impl="flowsuite", setting=f"{size}, {points} pts",
                     s=(time.perf_counter() - t0) / sample_shapes, nfe=_nfe(point_cnfs),
                     note=f"point-CNF NFE; latent {_nfe(latent_cnfs)}"))  # fmt: skip
    return rows


VERSUS_ROWS = {  # worker row -> (label, setting, processes' warm-up and timed repeats)
    "paper_step": ("train step", "paper: point 512-512-512, latent 256-256, zdim 128, batch 16 x 2048", 1, 1),
    "small_step": ("train step", "small: point 128-128, latent 256-256, zdim 64, batch 8 x 512", 1, 3),
    "sample": ("sampling per shape", "paper model, 2048 pts", 1, 1),
    "tiny_step": ("train step", "tiny (test): batch 2 x 64", 0, 1),
    "tiny_sample": ("sampling per shape", "tiny (test), 64 pts", 0, 1),
}
VERSUS_SETTINGS = (
    "both: dopri5, atol = rtol = 1e-5, adjoint backward, Hutchinson trace with Gaussian noise in training, moving "
    "batch-norm around each CNF, T = 0.5 learned, concatsquash tanh, Adam 1e-3; random weights, one seeded input. "
    "flowsuite: torch {torch}, torchdiffeq {fs_tdq}, adjoint seminorm, training solves warm-started at the previous "
    "solve's step size (flowsuite-cold: torchdiffeq's initial step); sampling without the trace (no_logdet). "
    "reference: its own code and argparse defaults, torchdiffeq {ref_tdq}; its sampling integrates the log-density "
    "(Hutchinson) as its CNF always does. NFE: calls of the ODE function (pre-hook), point / latent, forward + "
    "backward."
)


def _worker(spec: dict, reference_torchdiffeq: Path | None, threads: int) -> dict:
    """Run one side of one row in a fresh process (``bench_pointflow_worker.py``) and return its result."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if spec["impl"] == "reference":  # nothing of flowsuite on the path: the reference's own torchdiffeq first
        env["PYTHONPATH"] = str(reference_torchdiffeq) if reference_torchdiffeq else ""
    else:
        env["PYTHONPATH"] = str(root)
    spec = dict(spec, threads=threads)
    cmd = [sys.executable, str(root / "scripts" / "bench_pointflow_worker.py"), json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{spec['impl']} {spec['row']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def bench_versus(
    reference: Path, rows: Sequence[str], rounds: int, threads: int, reference_torchdiffeq: Path | None,
    sample_shapes: int,
) -> list[dict]:  # fmt: skip
    """flowsuite beside the reference, row by row: ``rounds`` rounds of one fresh process per side (training rows also
    flowsuite-cold: no warm-started step sizes), the order rotated every round; medians of the timed repeats, NFE
    and peak RSS, load average at each start."""
    out = []
    for row in rows:
        label, setting, warmup, repeats = VERSUS_ROWS[row]
        # training rows also time flowsuite without warm-started step sizes (what the warm start saves)
        impls = ["flowsuite", "reference"] + (["flowsuite-cold"] if row.endswith("step") else [])
        res: dict[str, list[dict]] = {impl: [] for impl in impls}
        loads: dict[str, list[float]] = {impl: [] for impl in impls}
        for r in range(rounds):
            for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:  # a different order every round
                spec = dict(impl=impl, row=row, warmup=warmup, repeats=repeats, seed=0, shapes=sample_shapes)
                if impl == "reference":
                    spec["reference"] = str(reference)
                loads[impl].append(os.getloadavg()[0])
                res[impl].append(_worker(spec, reference_torchdiffeq, threads))
                print(f"  {row} {impl} round {r + 1}: {res[impl][-1]['times']} NFE {res[impl][-1]['nfe']}", flush=True)
        rec = {}
        for impl, results in res.items():
            times = [t for x in results for t in x["times"]]
            nfes = [n for x in results for n in x["nfe"]]
            parts = sorted({k for n in nfes for k in n})
            rec[impl] = dict(
                what=label, impl=impl, setting=setting, s=statistics.median(times), times=times,
                nfe=statistics.median([sum(n.values()) for n in nfes]),
                nfe_parts={k: statistics.median([n.get(k, 0) for n in nfes]) for k in parts},
                point_nfe=statistics.median([n.get("point_fwd", 0) + n.get("point_bwd", 0) for n in nfes]),
                peak_mb=max(x["peak_mb"] for x in results), load=statistics.median(loads[impl]),
                torchdiffeq=results[0]["torchdiffeq"], settings=results[0]["settings"], row=row,
            )  # fmt: skip
        for impl in impls:
            if impl != "reference":
                rec[impl]["ratio"] = rec[impl]["s"] / rec["reference"]["s"]
                rec[impl]["mem_ratio"] = rec[impl]["peak_mb"] / rec["reference"]["peak_mb"]
        out += [rec[impl] for impl in impls]
    return out


def _print_versus(rows: list[dict], rounds: int, threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    fs = next(r for r in rows if r["impl"] == "flowsuite")
    ref = next(r for r in rows if r["impl"] == "reference")
    caption = VERSUS_SETTINGS.format(torch=torch.__version__, fs_tdq=fs["torchdiffeq"], ref_tdq=ref["torchdiffeq"])
    table = Table(title=f"flowsuite vs reference (stevenygd/PointFlow), {threads} threads, fresh processes "
                  f"alternating, medians of {rounds} rounds", caption=caption)  # fmt: skip
    for col in ("what", "setting", "impl", "time", "ratio", "NFE (pt fwd+bwd / lat fwd+bwd)", "peak MB", "load 1 min"):
        table.add_column(col, justify="left" if col in ("what", "setting", "impl") else "right")
    for r in rows:
        p = r["nfe_parts"]
        nfe = f"{r['nfe']:.0f} ({p.get('point_fwd', 0):.0f}+{p.get('point_bwd', 0):.0f} / "
        nfe += f"{p.get('latent_fwd', 0):.0f}+{p.get('latent_bwd', 0):.0f})"
        ratio = f"{r['ratio']:.2f}x time, {r['mem_ratio']:.2f}x mem" if "ratio" in r else ""
        table.add_row(r["what"], r["setting"], r["impl"], f"{r['s']:.3f} s", ratio, nfe, f"{r['peak_mb']:.0f}",
                      f"{r['load']:.1f}")  # fmt: skip
    Console(width=220).print(table)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a few seconds on a CPU)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (a JSON list)")
    ap.add_argument("--model", choices=["auto", "small", "paper"], default="auto", help="auto: small CPU, paper GPU")
    ap.add_argument("--batch", type=int, default=None, help="shapes per training step (default 16 GPU, 4 CPU)")
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per batched metric call")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per comparison")
    ap.add_argument("--repeats", type=int, default=2, help="timed training steps")
    ap.add_argument("--sample-shapes", type=int, default=4)
    ap.add_argument("--eval-shapes", type=int, default=100, help="S in the S x S 1-NNA matrices")
    ap.add_argument("--emd-block", type=int, default=4, help="CPU: approxmatch 1-NNA time from a k x k block")
    ap.add_argument("--no-emd", action="store_true")
    ap.add_argument("--no-model", action="store_true", help="metrics only")
    ap.add_argument("--reference", type=Path, default=None, help="a checkout of stevenygd/PointFlow: time it beside us")
    ap.add_argument("--reference-torchdiffeq", type=Path, default=None,
                    help="a folder holding torchdiffeq 0.0.1 (pip install --no-deps --target DIR torchdiffeq==0.0.1), "
                    "put first on the reference's path")  # fmt: skip
    ap.add_argument("--versus-rows", default="paper_step,small_step,sample",
                    help=f"rows of the reference comparison, comma-separated, of {', '.join(VERSUS_ROWS)}")  # fmt: skip
    ap.add_argument("--versus-rounds", type=int, default=2, help="processes per side and row (a paper step ~90 s)")
    ap.add_argument("--versus-only", action="store_true", help="with --reference: only the comparison table")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the comparison's processes")
    args = ap.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        size, batch, points, pairs, rounds, shapes, repeats, sample_shapes = "tiny", 2, 128, 2, 1, 4, 1, 1
    else:
        size = args.model if args.model != "auto" else ("paper" if device == "cuda" else "small")
        batch, points, pairs, rounds = (
            args.batch or (16 if device == "cuda" else 4),
            args.points,
            args.pairs,
            args.rounds,
        )
        shapes, repeats, sample_shapes = args.eval_shapes, args.repeats, args.sample_shapes
    versus: list[dict] = []
    if args.reference is not None:
        names = ["tiny_step", "tiny_sample"] if args.quick else [x for x in args.versus_rows.split(",") if x]
        unknown = set(names) - set(VERSUS_ROWS)
        if unknown:
            ap.error(f"unknown --versus-rows {sorted(unknown)}; choose from {list(VERSUS_ROWS)}")
        versus = bench_versus(args.reference, names, 1 if args.quick else args.versus_rounds, args.threads,
                              args.reference_torchdiffeq, 1 if args.quick else args.sample_shapes)  # fmt: skip
        for r in versus:
            r["device"] = "cpu"
    rows: list[dict] = []
    if not (args.versus_only and versus):
        rows = bench_pairs(pairs, points, device, rounds, not args.no_emd)
        rows += bench_one_nna(shapes, points, device, not args.no_emd, args.emd_block)
        if not args.no_model:
            rows += bench_model(size, batch, points, sample_shapes, device, repeats)
    for r in rows:
        r["device"] = device

    from rich.console import Console
    from rich.table import Table

    title = (f"PointFlow benchmark ({device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"medians of {rounds} alternating rounds)")  # fmt: skip
    table = Table(title=title)
    for col in ("what", "impl", "setting", "time", "speedup", "NFE", "peak MB", "note"):
        table.add_column(col, justify="right" if col in ("time", "speedup", "NFE", "peak MB") else "left")
    for r in rows:
        t = f"{r['ms']:.2f} ms" if "ms" in r else f"{r['s']:.3f} s"
        table.add_row(
            r["what"], r["impl"], r["setting"], t, f"{r['speedup']:.1f}x" if "speedup" in r else "",
            f"{r['nfe']:.0f}" if "nfe" in r else "", f"{r['peak_mb']:.0f}" if "peak_mb" in r else "",
            r.get("note", ""),
        )  # fmt: skip
    if rows:
        Console(width=200).print(table)
    if versus:
        _print_versus(versus, 1 if args.quick else args.versus_rounds, args.threads)
    rows += versus
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
