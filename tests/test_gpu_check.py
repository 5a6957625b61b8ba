"""The GPU check's machinery (time limits, isolation, report) and its CPU --quick run of real checks."""

from __future__ import annotations

import json
import time

import pytest

from scripts.gpu_check import Check, build_checks, main, run_checks, write_report


def test_a_failure_or_time_out_never_stops_the_other_checks(tmp_path):
    checks = [
        Check("slow", ["timeit", "-n", "100000000000", "pass"], limit_s=3),
        Check("broken", ["json.tool", str(tmp_path / "missing.json")], limit_s=30),
        Check("after-broken", ["timeit", "-n", "1", "pass"], limit_s=30, needs="broken"),
        Check(
            "fine",
            ["timeit", "-n", "1", "pass"],
            limit_s=30,
            figure=lambda folder: (2.0, "x"),
            goal="> 1",
            goal_met=lambda v: v > 1,
        ),  # fmt: skip
    ]
    results = {r.name: r for r in run_checks(checks, tmp_path, budget_s=60, progress=lambda r: None)}
    assert results["slow"].status == "timeout" and results["slow"].seconds < 10
    assert results["broken"].status == "fail" and "exit code" in results["broken"].detail
    assert results["after-broken"].status == "skipped" and "needs a passing broken" in results["after-broken"].detail
    assert results["fine"].status == "pass" and results["fine"].goal_met is True
    text = write_report(list(results.values()), {"device": "cpu", "torch": "x", "cuda": None}, tmp_path, 1.0)
    assert "1 passed, 3 failed" in text
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["status"] for r in report["results"]] == ["timeout", "fail", "skipped", "pass"]


def test_the_total_budget_is_kept(tmp_path):
    checks = [Check(f"c{i}", ["timeit", "-n", "100000000000", "pass"], limit_s=100) for i in range(3)]
    results = run_checks(checks, tmp_path, budget_s=4, progress=lambda r: None)
    assert sum(r.seconds for r in results) < 12
    assert results[-1].status == "skipped"


def test_timed_checks_run_alone_first_then_apps_in_parallel_chains(tmp_path):
    def sleep(seconds: float) -> list[str]:
        return ["timeit", "-n", "1", "-r", "1", f"import time; time.sleep({seconds})"]

    checks = [
        Check("a/train", sleep(1.5), limit_s=30),
        Check("a/generate", sleep(0.1), limit_s=30, needs="a/train"),
        Check("b/train", sleep(1.5), limit_s=30),
        Check("b/bench", sleep(0.1), limit_s=30, alone=True),
    ]
    finished: list[str] = []
    start = time.perf_counter()
    results = run_checks(checks, tmp_path, budget_s=60, progress=lambda r: finished.append(r.name), jobs=2)
    wall = time.perf_counter() - start
    assert [r.name for r in results] == [c.name for c in checks]  # the report keeps the given order
    assert all(r.status == "pass" for r in results), [(r.name, r.detail) for r in results]
    assert finished[0] == "b/bench"  # the timed check ran before every other
    assert finished.index("a/generate") > finished.index("a/train")  # a chain keeps its order
    assert wall < sum(r.seconds for r in results) - 1.0  # the two trainings overlapped


def test_gpu_checks_cover_every_app_and_benchmark():
    names = [c.name for c in build_checks("cuda", quick=False, gpus=2)]
    for app, gen in [
        ("pointflow", "sample"),
        ("graphaf", "sample"),
        ("waveflow", "synthesize"),
        ("videoflow", "predict"),
    ]:
        assert {f"{app}/train-bf16", f"{app}/train-ddp", f"{app}/{gen}"} <= set(names)
    benches = [n for n in names if n.split("/")[1].startswith("bench")]
    assert len(benches) == 4 and names[:4] == benches  # the timed checks come first
    gpu_train = next(c for c in build_checks("cuda", False, 2) if c.name == "pointflow/train-bf16")
    assert "trainer.precision=bf16-mixed" in gpu_train.argv
    ddp = next(c for c in build_checks("cuda", False, 2) if c.name == "pointflow/train-ddp")
    assert "trainer.devices=2" in ddp.argv


def test_quick_cpu_run_of_one_app_and_its_benchmark(tmp_path):
    """The real commands at toy sizes on the CPU: train, DDP, generation from the checkpoint, the benchmark."""
    rc = main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--only", "pointflow/"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {r["name"]: (r["status"], r["detail"]) for r in report["results"]}
    assert rc == 0, statuses
    assert len(statuses) == 4
    assert report["info"]["device"].startswith("cpu")


@pytest.mark.slow
def test_quick_cpu_run_of_every_check(tmp_path):
    rc = main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, {r["name"]: (r["status"], r["detail"]) for r in report["results"]}
