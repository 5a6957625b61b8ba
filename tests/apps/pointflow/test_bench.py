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
    assert {r["impl"] for r in rows if r["what"] == "1-NNA matrices"} == {"CD (kdtree)", "EMD (approxmatch, torch)"}
    step = next(r for r in rows if r["what"] == "train step")
    assert step["nfe"] > 0 and step["s"] > 0 and all(r["device"] == "cpu" for r in rows)


def test_benchmark_beside_the_reference(tmp_path):
    """``--reference``: both sides in fresh processes, NFE counted on each. Needs a checkout of stevenygd/PointFlow
    (POINTFLOW_REFERENCE) and a folder holding torchdiffeq 0.0.1 (POINTFLOW_REFERENCE_TORCHDIFFEQ, optional)."""
    import os

    import pytest

    ref = os.environ.get("POINTFLOW_REFERENCE")
    if not ref:
        pytest.skip("set POINTFLOW_REFERENCE to a checkout of stevenygd/PointFlow")
    from scripts.bench_pointflow import main

    argv = ["--quick", "--versus-only", "--reference", ref, "--json", str(tmp_path / "b.json")]
    if os.environ.get("POINTFLOW_REFERENCE_TORCHDIFFEQ"):
        argv += ["--reference-torchdiffeq", os.environ["POINTFLOW_REFERENCE_TORCHDIFFEQ"]]
    main(argv)
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {(r["row"], r["impl"]) for r in rows} == {
        (row, impl) for row in ("tiny_step", "tiny_sample") for impl in ("flowsuite", "reference")
    } | {("tiny_step", "flowsuite-cold")}  # the training row also times flowsuite without warm-started steps
    for r in rows:
        assert r["s"] > 0 and r["peak_mb"] > 0 and r["nfe_parts"].get("point_fwd", 0) > 0
        if r["row"] == "tiny_step":
            assert r["nfe_parts"]["point_bwd"] > 0 and r["nfe_parts"]["latent_bwd"] > 0
