"""scripts/bench_pointflow.py --quick runs on a CPU in seconds and writes its table's rows as JSON."""

from __future__ import annotations

import json


def test_benchmark_script_quick(tmp_path):
    from scripts.bench_pointflow import main

    main(["--quick", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    rows = json.loads((tmp_path / "b.json").read_text())
    chamfer = {r["impl"]: r for r in rows if r["what"] == "Chamfer per pair"}
    assert set(chamfer) == {"direct (cdist, before)", "matmul", "kdtree"} and all(
        r["ms"] > 0 for r in rows if "ms" in r
    )
    assert all("e-" in r["note"] for r in chamfer.values())  # each method's deviation from float64 is reported
    emd = {r["impl"] for r in rows if r["what"] == "EMD per pair"}
    assert emd == {"approxmatch", "exact (Hungarian)", "sinkhorn"}
    assert {r["impl"] for r in rows if r["what"] == "1-NNA matrices"} == {"CD (kdtree)", "EMD (approxmatch)"}
    step = next(r for r in rows if r["what"] == "train step")
    assert step["nfe"] > 0 and step["s"] > 0 and all(r["device"] == "cpu" for r in rows)
