"""One GPU check: every GPU path of flowsuite in one unattended command that leaves a report.

    python -m scripts.gpu_check                      # on a machine with CUDA GPUs (or: make gpu-check)
    python -m scripts.gpu_check --quick --device cpu # the same checks at toy sizes (the test suite runs this)

First the benchmark scripts on the GPU, one at a time with nothing else running (their figures are timings). Then, per
app, a short training run on one GPU in bf16 mixed precision, a DDP run on every visible GPU, and the app's generation
command from the checkpoint, several apps at once (``--jobs``). Every check runs in its own process
with its own time limit inside a total budget: a failure or a time-out in one never stops the others. The report is
one table on stdout and ``gpu_check.json`` / ``gpu_check.md`` in ``--out`` (default ``outputs/gpu_check/<time>``):
each check with pass/fail, time, figure and goal, and the device, torch and CUDA versions.

A goal is "met" only when it was measured on a GPU; on the CPU (``--device cpu``) figures are printed and goals are
left unjudged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

__all__ = ["Check", "Result", "build_checks", "run_checks", "main"]


@dataclass
class Check:
    """One command of the check: ``python -m <argv...>`` with a time limit, and how to read its figure."""

    name: str
    argv: list[str]
    limit_s: float
    figure: Callable[[Path], tuple[float | None, str]] | None = None  # (value, unit) from the check's folder
    goal: str = ""
    goal_met: Callable[[float], bool] | None = None
    needs: str | None = None  # name of a check whose success this one needs (a checkpoint)
    alone: bool = False  # a timed check: runs before the others, with nothing else running


@dataclass
class Result:
    name: str
    status: str  # pass | fail | timeout | skipped
    seconds: float
    figure: float | None = None
    unit: str = ""
    goal: str = ""
    goal_met: bool | None = None
    detail: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)


# ---- reading figures -------------------------------------------------------------------------------------------
def _metrics(folder: Path) -> dict[str, Any]:
    path = folder / "run" / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _steps_per_second(folder: Path) -> tuple[float | None, str]:
    m, log = _metrics(folder), folder / "seconds.txt"
    if "global_step" not in m or not log.is_file():
        return None, "steps/s"
    return m["global_step"] / max(float(log.read_text()), 1e-9), "steps/s (incl. start-up)"


def _bench_rows(folder: Path) -> list[dict[str, Any]]:
    path = folder / "bench.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else data.get("rows", [])


def _rows(
    match: dict[str, Any], key: str, unit: str, reduce: Callable[[list[float]], float] = lambda v: v[0]
) -> Callable[[Path], tuple[float | None, str]]:
    """A figure reader: ``reduce`` (default: the first) of ``key`` over the benchmark rows whose fields contain
    ``match`` (case-insensitive substrings); None when no row matches."""

    def read(folder: Path) -> tuple[float | None, str]:
        values = [
            float(row[key])
            for row in _bench_rows(folder)
            if all(str(v).lower() in str(row.get(k, "")).lower() for k, v in match.items())
            and isinstance(row.get(key), (int, float))
            and math.isfinite(row[key])
        ]
        return (reduce(values) if values else None), unit

    return read


# ---- the checks ------------------------------------------------------------------------------------------------
# Per app: overrides that make a run short (every size), overrides that make it tiny (--quick), the generation
# command with its arguments, and the benchmark arguments.
APPS: dict[str, dict[str, Any]] = {
    "pointflow": {
        "short": ["trainer.max_steps=20", "trainer.limit_val_batches=1", "render_after_fit=false"],
        "tiny": [
            "model.zdim=8",
            "model.point_hidden=[16,16]",
            "model.latent_hidden=[16,16]",
            "model.atol=1e-3",
            "model.rtol=1e-3",
            "data.points=64",
            "data.eval_points=64",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "data.max_shapes=8",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "render_after_fit=false",
        ],
        "generate": ("sample", ["n=16"], ["n=2", "points=32", "batch_size=2"]),
    },
    "graphaf": {
        "short": [
            "experiment=paper",
            "data.max_molecules=20000",
            "trainer.max_steps=30",
            "trainer.limit_val_batches=2",
            "samples_after_fit=64",
            "min_atoms=1",  # a 30-step model makes small molecules: keep them (the paper's 7 would redraw for long)
        ],
        "tiny": [
            "model.hidden=16",
            "model.rgcn_layers=2",
            "model.flow_layers=2",
            "model.st_hidden=[16]",
            "data.max_molecules=300",
            "data.batch_size=32",
            "samples_after_fit=8",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
        ],
        "generate": ("sample", ["n=1024", "batch_size=512", "min_atoms=1"], ["n=8", "batch_size=8"]),
    },
    "waveflow": {
        "short": ["trainer.max_steps=20", "trainer.limit_val_batches=1"],
        "tiny": [
            "model.height=8",
            "model.n_flows=2",
            "model.n_layers=2",
            "model.channels=8",
            "data.segment_length=2048",
            "data.batch_size=2",
            "data.eval_batch_size=3",
            "data.train_repeat=1",
            "module.sample_seconds=0.25",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
        ],
        "generate": (
            "synthesize",
            ["input=data/waveflow/ljspeech/wavs/LJ001-0002.wav"],
            ["input=data/waveflow/ljspeech/wavs/LJ001-0002.wav"],
        ),
    },
    "videoflow": {
        "short": ["trainer.max_steps=20", "trainer.limit_val_batches=1", "module.sample_every_n_epochs=0"],
        "tiny": [
            "model.steps=1",
            "model.hidden=8",
            "model.prior_hidden=8",
            "model.prior_blocks=1",
            "model.levels=2",
            "data.size=16",
            "data.num_train=8",
            "data.num_val=4",
            "data.num_test=4",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "data.target_frames=2",
            "module.sample_every_n_epochs=0",
            "trainer.max_steps=2",
        ],
        "generate": ("predict", ["num_videos=2", "num_samples=2"], ["num_videos=1", "num_samples=1"]),
    },
}

COMMON = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=-1",
]


def _bench_checks(device: str, quick: bool) -> list[Check]:
    q = ["--quick"] if quick else []
    d = ["--device", device]
    on_gpu = device == "cuda"
    return [
        Check(
            "waveflow/bench-synthesis",
            [
                "scripts.bench_waveflow",
                *d,
                *q,
                *(["--channels", "64", "--batches", "1", "8", "--profile"] if on_gpu else []),
            ],
            120,
            _rows({"what": "synthesis", "channels": "64", "batch": "1"}, "x_realtime", "x real time (best)", max)
            if on_gpu
            else _rows({"batch": "1"}, "x_realtime", "x real time"),
            goal=">= 300x real time, 64 channels, batch 1 (best of fp32 / bf16 / fp16 / CUDA graphs)" if on_gpu else "",
            goal_met=(lambda v: v >= 300) if on_gpu else None,
            alone=True,
        ),
        Check(
            "pointflow/bench-1nna-405",
            [
                "scripts.bench_pointflow",
                *d,
                *q,
                "--no-model",
                *([] if quick else ["--eval-shapes", "405", "--points", "2048"]),
            ],
            150,
            _rows({"what": "1-NNA matrices"}, "s", "s (CD + EMD approxmatch)", sum),
            goal="1-NNA in CD and EMD (approxmatch), 405 x 405 clouds of 2,048 points, < 60 s" if on_gpu else "",
            goal_met=(lambda v: v < 60) if on_gpu else None,
            alone=True,
        ),
        Check(
            "graphaf/bench-zinc",
            [
                "scripts.bench_graphaf",
                *d,
                *q,
                *(["--data", "zinc", "--ckpt", "data/pretrained/graphaf-qm9"] if on_gpu else []),
            ],
            90,
            _rows({"what": "train sparse", "data": "zinc"}, "molecules_per_s", "molecules/s (ZINC training)"),
            alone=True,
        ),
        Check(
            "videoflow/bench-generation",
            ["scripts.bench_videoflow", *d, *q, *(["--models", "paper"] if on_gpu else [])],
            60,
            _rows({"model": "paper", "what": "generation b=1", "dtype": "bf16"}, "frames_per_s", "frames/s")
            if on_gpu
            else _rows({"what": "generation b=1"}, "frames_per_s", "frames/s"),
            goal="paper model 64 x 64 (the paper: ~20 frames in < 3.5 s on a P100)" if on_gpu else "",
            alone=True,
        ),
    ]


def build_checks(device: str, quick: bool, gpus: int, only: list[str] | None = None) -> list[Check]:
    """The checks for ``device`` (``cuda`` or ``cpu``), the timed benchmarks first; ``quick`` uses toy sizes;
    ``only`` keeps names with a prefix."""
    checks: list[Check] = _bench_checks(device, quick)
    on_gpu = device == "cuda"
    single = ["trainer=gpu", "trainer.precision=bf16-mixed"] if on_gpu else ["trainer=cpu"]
    multi = ["trainer=ddp", f"trainer.devices={max(gpus, 1)}"] if on_gpu else ["trainer=ddp_cpu", "trainer.devices=2"]
    for app, spec in APPS.items():
        size = spec["tiny"] if quick else spec["short"]
        command, gen_full, gen_tiny = spec["generate"]
        train = f"{app}/train-{'bf16' if on_gpu else 'cpu'}"
        checks.append(Check(train, [f"apps.{app}", "train", *single, *COMMON, *size], 150, _steps_per_second))
        checks.append(
            Check(f"{app}/train-ddp", [f"apps.{app}", "train", *multi, *COMMON, *size], 150, _steps_per_second)
        )
        gen = gen_tiny if quick else gen_full
        dev = ["device=cuda"] if on_gpu else ["device=cpu"]
        checks.append(
            Check(f"{app}/{command}", [f"apps.{app}", command, "ckpt={run:" + train + "}", *gen, *dev], 90, needs=train)
        )
    # the tests that only a GPU runs (Triton kernels, CUDA graphs, half precision); elsewhere they skip
    checks.append(Check("kernels/pytest", ["pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS, "-k", GPU_TEST_FILTER],
                        240))  # fmt: skip
    if only:
        checks = [c for c in checks if any(c.name.startswith(o) for o in only)]
    return checks


GPU_TESTS = [
    "tests/apps/waveflow/test_row_triton.py",
    "tests/apps/waveflow/test_speed.py",
    "tests/apps/pointflow/test_metrics.py",
    "tests/core/test_affine.py",
]
GPU_TEST_FILTER = "triton or cuda or half or fused or self_check or row_impl"


# ---- running ---------------------------------------------------------------------------------------------------
def _run_one(check: Check, folder: Path, limit: float, env: dict[str, str]) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    argv = [a.replace("{out}", str(folder)) for a in check.argv]
    if argv[0].startswith("apps."):
        argv.append(f"hydra.run.dir={folder / 'run'}")  # the command's own run dir; the check's log stays beside it
    elif argv[0].startswith("scripts.bench_"):
        argv += ["--json", str(folder / "bench.json")]
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=limit)
            status = "pass" if rc == 0 else "fail"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: DDP workers and data loaders too
            proc.wait()
            status, rc = "timeout", None
    seconds = time.perf_counter() - start
    (folder / "seconds.txt").write_text(f"{seconds:.3f}\n")
    result = Result(check.name, status, seconds, goal=check.goal)
    if status != "pass":
        tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-12:]
        result.detail = (f"exit code {rc}: " if rc is not None else f"no result within {limit:.0f} s: ") + " | ".join(
            tail[-3:]
        )
        return result
    if check.figure is not None:
        result.figure, result.unit = check.figure(folder)
    result.rows = _bench_rows(folder)
    if check.goal_met is not None and result.figure is not None:
        result.goal_met = bool(check.goal_met(result.figure))
    return result


def _chains(checks: list[Check]) -> list[list[Check]]:
    """Checks grouped into chains that run in order: one per app (the name's part before '/'); a check that needs
    another joins that one's chain."""
    chains: dict[str, list[Check]] = {}
    key_of: dict[str, str] = {}
    for check in checks:
        key = key_of.get(check.needs, check.needs) if check.needs is not None else check.name.split("/")[0]
        key_of[check.name] = key
        chains.setdefault(key, []).append(check)
    return list(chains.values())


def run_checks(
    checks: list[Check],
    out: Path,
    budget_s: float,
    progress: Callable[[Result], None] = print,
    jobs: int = 1,
) -> list[Result]:
    """Run ``checks`` within ``budget_s`` seconds in all; each gets ``min(limit, what is left)``.

    Timed checks (``Check.alone``: the benchmarks) run first, one at a time, with nothing else on the machine; the
    others then run ``jobs`` chains at a time (a chain: the checks of one app, in order). Results come back in the
    order of ``checks``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    deadline = time.perf_counter() + budget_s
    done: dict[str, Result] = {}
    lock = threading.Lock()

    def run_chain(chain: list[Check]) -> None:
        for check in chain:
            folder = out / check.name.replace("/", "__")
            left = deadline - time.perf_counter()
            needed = done.get(check.needs) if check.needs is not None else None
            if check.needs is not None and (needed is None or needed.status != "pass"):
                result = Result(check.name, "skipped", 0.0, goal=check.goal, detail=f"needs a passing {check.needs}")
            elif left < 5:
                result = Result(check.name, "skipped", 0.0, goal=check.goal, detail="the total time budget is spent")
            else:
                if check.needs is not None:
                    run_dir = str(out / check.needs.replace("/", "__") / "run")
                    check.argv = [a.replace("{run:" + check.needs + "}", run_dir) for a in check.argv]
                result = _run_one(check, folder, min(check.limit_s, left), env)
            with lock:
                done[check.name] = result
                progress(result)

    for chain in _chains([c for c in checks if c.alone]):
        run_chain(chain)
    rest = _chains([c for c in checks if not c.alone])
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(run_chain, chain) for chain in rest]:
            future.result()
    return [done[c.name] for c in checks]


# ---- reporting -------------------------------------------------------------------------------------------------
def device_info(device: str) -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu", "gpus": 0}
    if device == "cuda" and torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def _fmt(r: Result) -> list[str]:
    fig = "" if r.figure is None else f"{r.figure:.4g} {r.unit}"
    met = {True: "met", False: "NOT met", None: ""}[r.goal_met]
    return [r.name, r.status, f"{r.seconds:.1f}", fig, f"{r.goal} {met}".strip(), r.detail[:160]]


def write_report(results: list[Result], info: dict[str, Any], out: Path, total_s: float) -> str:
    header = ["check", "status", "seconds", "figure", "goal", "detail"]
    lines = [
        f"# flowsuite GPU check: {info['device']}, torch {info['torch']}, CUDA {info['cuda']}, {total_s:.0f} s in all",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    if info.get("app_checks_at_once", 1) > 1:
        lines[1:1] = [
            "",
            f"The benchmarks ran alone; then the apps' checks ran {info['app_checks_at_once']} apps at a time, so "
            "their steps/s are functional figures, not speed measurements.",
        ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _fmt(r)) + " |" for r in results]
    passed = sum(r.status == "pass" for r in results)
    lines += ["", f"{passed} passed, {len(results) - passed} failed"]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    report = {"info": info, "seconds": total_s, "results": [asdict(r) for r in results]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="toy sizes: seconds per check (what the test suite runs)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default outputs/gpu_check/<time>)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all checks together")
    p.add_argument("--only", nargs="*", default=None, help="run only checks whose name starts with one of these")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="apps checked at once after the benchmarks, which run alone (default: 4 on a GPU, 1 on the CPU)",
    )
    args = p.parse_args(argv)

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU on this machine")
    out = args.out or REPO / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    info = device_info(device)
    print(f"flowsuite GPU check on {info['device']} (torch {info['torch']}, CUDA {info['cuda']}); report in {out}")
    checks = build_checks(device, args.quick, info["gpus"], args.only)
    start = time.perf_counter()

    def progress(r: Result) -> None:
        figure = "" if r.figure is None else f"{r.figure:.4g} {r.unit}"
        detail = f"  {r.detail[:200]}" if r.detail else ""
        print(f"  {r.name:<28} {r.status:<8} {r.seconds:6.1f} s  {figure}{detail}", flush=True)

    jobs = args.jobs or (4 if device == "cuda" else 1)
    info["app_checks_at_once"] = jobs
    results = run_checks(checks, out, args.budget, progress, jobs=jobs)
    print()
    print(write_report(results, info, out, time.perf_counter() - start))
    return 0 if all(r.status == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
