"""Tests for apps.pointflow.metrics (CPU, small clouds)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from apps.pointflow.metrics import (
    approxmatch_plan,
    chamfer_distance,
    compute_all_metrics,
    emd_approxmatch,
    emd_exact,
    emd_sinkhorn,
    jsd_between_sets,
    mmd_cov,
    one_nn_accuracy,
    pairwise_distances,
)
from tests.helpers import triton_test_device


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ellipsoids(n_clouds: int, n_points: int, seed: int, center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Noisy ellipsoid surfaces with random radii in [0.15, 0.35]: one random 'shape family'. (n_clouds, n_points, 3)"""
    g = _gen(seed)
    v = torch.randn(n_clouds, n_points, 3, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    radii = 0.15 + 0.2 * torch.rand(n_clouds, 1, 3, generator=g)
    noise = 0.01 * torch.randn(n_clouds, n_points, 3, generator=g)
    return v * radii + noise + torch.tensor(center)


def _boxes(n_clouds: int, n_points: int, seed: int) -> torch.Tensor:
    """Points filling thin random boxes: a family very different from ellipsoid surfaces."""
    g = _gen(seed)
    half = torch.tensor([0.4, 0.05, 0.05]) * (0.8 + 0.4 * torch.rand(n_clouds, 1, 3, generator=g))
    return (2 * torch.rand(n_clouds, n_points, 3, generator=g) - 1) * half


# ---------------------------------------------------------------------------------------------------------------
# distances between two clouds
# ---------------------------------------------------------------------------------------------------------------


def test_chamfer_matches_brute_force():
    g = _gen(0)
    x, y = torch.rand(3, 5, 3, generator=g), torch.rand(3, 7, 3, generator=g)
    got = chamfer_distance(x, y)
    assert got.shape == (3,)
    for b in range(3):
        sq = [[sum((x[b, i, k] - y[b, j, k]).item() ** 2 for k in range(3)) for j in range(7)] for i in range(5)]
        want = sum(min(row) for row in sq) / 5 + sum(min(sq[i][j] for i in range(5)) for j in range(7)) / 7
        assert got[b].item() == pytest.approx(want, rel=1e-5)


def test_chamfer_zero_for_identical_and_symmetric():
    x = torch.rand(2, 50, 3, generator=_gen(1))
    y = torch.rand(2, 40, 3, generator=_gen(2))
    assert torch.all(chamfer_distance(x, x.clone()) == 0)
    torch.testing.assert_close(chamfer_distance(x, y), chamfer_distance(y, x))


def test_chamfer_methods_agree_and_match_direct_distances():
    x, y = _ellipsoids(3, 300, seed=12), _boxes(3, 250, seed=13)
    d2 = torch.cdist(x.double(), y.double()).square()
    want = d2.amin(2).mean(1) + d2.amin(1).mean(1)
    for method in ("kdtree", "matmul", "auto"):
        torch.testing.assert_close(chamfer_distance(x, y, method).double(), want, rtol=1e-5, atol=1e-8)
    far = x + 100.0  # the matmul path centres the clouds: no cancellation from a large common offset
    torch.testing.assert_close(chamfer_distance(far, y + 100.0, "matmul").double(), want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="unknown Chamfer method"):
        chamfer_distance(x, y, "octree")


# ---------------------------------------------------------------------------------------------------------------
# approxmatch (the EMD of PointFlow's table)
# ---------------------------------------------------------------------------------------------------------------


def _approxmatch_loops(ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """approxmatch.cu written as its loops, one point at a time (float64): the plan (n, m) and the match cost."""
    n, m = len(ref), len(x)
    match = [[0.0] * m for _ in range(n)]
    remain_l = [1.0 if n >= m else float(m // n)] * n
    remain_r = [float(n // m) if n >= m else 1.0] * m
    d2 = [[float(((ref[k] - x[l]) ** 2).sum()) for l in range(m)] for k in range(n)]
    for j in range(7, -2, -1):
        level = -(4.0**j)
        ratio_l = [
            remain_l[k] / (1e-9 + sum(math.exp(level * d2[k][l]) * remain_r[l] for l in range(m))) for k in range(n)
        ]
        ratio_r = [0.0] * m
        for l in range(m):
            s = sum(math.exp(level * d2[k][l]) * ratio_l[k] for k in range(n)) * remain_r[l]
            ratio_r[l] = min(remain_r[l] / (s + 1e-9), 1.0) * remain_r[l]
            remain_r[l] = max(0.0, remain_r[l] - s)
        for k in range(n):
            s = 0.0
            for l in range(m):
                w = math.exp(level * d2[k][l]) * ratio_l[k] * ratio_r[l]
                match[k][l] += w
                s += w
            remain_l[k] = max(0.0, remain_l[k] - s)
    cost = sum(match[k][l] * math.sqrt(d2[k][l]) for k in range(n) for l in range(m))
    return torch.tensor(match, dtype=torch.float64), cost


@pytest.mark.parametrize("n, m", [(9, 9), (6, 13), (13, 6)])
def test_approxmatch_equals_the_kernel_loops(n, m):
    g = _gen(20 + n)
    ref, x = (
        torch.rand(2, n, 3, generator=g, dtype=torch.float64),
        torch.rand(2, m, 3, generator=g, dtype=torch.float64),
    )
    plan = approxmatch_plan(ref, x)
    for b in range(2):
        want, cost = _approxmatch_loops(ref[b], x[b])
        torch.testing.assert_close(plan[b], want, rtol=1e-10, atol=1e-12)
        if n == m:
            assert emd_approxmatch(ref[b : b + 1], x[b : b + 1]).item() == pytest.approx(cost / n, rel=1e-10)


@pytest.mark.parametrize("n, batch", [(100, 3), (257, 2)])  # not multiples of the kernels' blocks: masks
def test_approxmatch_triton_kernels_equal_the_torch_version(n, batch):
    device = triton_test_device()
    g = _gen(30 + n)
    ref = torch.rand(batch, n, 3, generator=g) - 0.5
    x = torch.rand(batch, n, 3, generator=g) - 0.5
    x[0] = ref[0] + 1e-3 * torch.randn(n, 3, generator=g)  # one pair of near copies: the first levels match it
    want = emd_approxmatch(ref.double(), x.double(), impl="torch")
    got = emd_approxmatch(ref.to(device), x.to(device), impl="triton")
    assert got.dtype == torch.float32 and got.device.type == device.type
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=1e-8)
    # the column cloud first, as pairwise_distances calls it, and through its chunking
    d = pairwise_distances(x.to(device), ref.to(device), metric="emd_approxmatch", batch_size=2)
    want_d = torch.stack([emd_approxmatch(ref.double(), x[i : i + 1].double().expand_as(ref)) for i in range(batch)])
    torch.testing.assert_close(d.cpu().double(), want_d, rtol=2e-5, atol=1e-8)


def _grid(n_side: int) -> torch.Tensor:
    """Points of a regular grid with spacing 1: every kernel level but the last sees only a point's own copy."""
    r = torch.arange(n_side, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(1, -1, 3)


def test_approxmatch_identical_clouds_give_zero():
    x = _grid(4)  # 64 points
    assert emd_approxmatch(x, x.clone()).item() == 0.0
    perm = x[:, torch.randperm(64, generator=_gen(21))]
    assert emd_approxmatch(x, perm).item() == 0.0


def test_approxmatch_small_perturbation_gives_the_exact_emd():
    x = _grid(4).double()
    y = x + 0.01 * torch.randn(x.shape, generator=_gen(22), dtype=torch.float64)
    exact = emd_exact(x, y)
    torch.testing.assert_close(emd_approxmatch(x, y), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(emd_approxmatch(y, x), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", [23, 24, 25])
def test_approxmatch_plan_is_a_partial_transport_and_costs_at_least_the_exact_emd(seed):
    a = _ellipsoids(3, 200, seed=seed)
    b = torch.cat([_ellipsoids(2, 200, seed=seed + 100), _boxes(1, 200, seed=seed)])
    plan = approxmatch_plan(a, b)
    assert plan.shape == (3, 200, 200) and (plan >= 0).all()
    assert (plan.sum(2) <= 1 + 1e-5).all() and (plan.sum(1) <= 1 + 1e-5).all()
    assert (plan.sum((1, 2)) > 0.99 * 200).all()  # unit-scale clouds: the widest level moves nearly all mass
    cost = (plan * torch.cdist(a, b)).sum((1, 2)) / 200
    approx = emd_approxmatch(a, b)
    torch.testing.assert_close(approx, cost, rtol=1e-4, atol=1e-7)
    exact = emd_exact(a, b)
    assert (approx >= exact * (1 - 1e-5)).all(), (approx, exact)
    assert (approx > exact * 1.05).any(), "on independent clouds approxmatch lies clearly above the optimum"


def test_approxmatch_is_not_symmetric_and_pairwise_puts_the_reference_first():
    s, r = _ellipsoids(3, 64, seed=26), _boxes(2, 64, seed=27)
    a, b = emd_approxmatch(s[:1], r[:1]), emd_approxmatch(r[:1], s[:1])
    assert not torch.allclose(a, b, rtol=1e-6, atol=0), "the test needs an asymmetric pair"
    d_sr = pairwise_distances(s, r, "emd_approxmatch", batch_size=4)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(d_sr[i, j], emd_approxmatch(r[j : j + 1], s[i : i + 1])[0])
    d_ss = pairwise_distances(s, s, "emd_approxmatch")  # no mirroring for an asymmetric metric
    torch.testing.assert_close(d_ss[0, 1], emd_approxmatch(s[1:2], s[0:1])[0])
    torch.testing.assert_close(d_ss[1, 0], emd_approxmatch(s[0:1], s[1:2])[0])
    assert torch.all(d_ss.diagonal() == 0)


def test_emd_exact_matches_brute_force_over_permutations():
    g = _gen(3)
    x, y = torch.rand(4, 5, 3, generator=g), torch.rand(4, 5, 3, generator=g)
    got = emd_exact(x, y)
    assert got.shape == (4,)
    for b in range(4):
        d = torch.cdist(x[b].double(), y[b].double())
        want = min(sum(d[i, p[i]].item() for i in range(5)) / 5 for p in itertools.permutations(range(5)))
        assert got[b].item() == pytest.approx(want, rel=1e-5)


def test_emd_exact_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="equal size"):
        emd_exact(torch.rand(1, 5, 3), torch.rand(1, 6, 3))


def test_emd_exact_of_permuted_copy_is_zero():
    x = torch.rand(2, 64, 3, generator=_gen(4))
    y = x[:, torch.randperm(64, generator=_gen(5))]
    assert torch.all(emd_exact(x, y) == 0)


def test_emd_sinkhorn_close_to_exact():
    # Docstring promise: a lower bound of the exact EMD, at most ~1 % below it (measured 0.04-0.4 %).
    g = _gen(6)
    x = torch.rand(4, 300, 3, generator=g) - 0.5
    y = _ellipsoids(4, 300, seed=7) * 1.5
    for a, b in ((x, x.flip(0)), (x, y)):
        exact = emd_exact(a, b)
        approx = emd_sinkhorn(a, b)
        rel = (approx - exact) / exact
        assert torch.all(rel <= 1e-4), rel
        assert torch.all(rel >= -0.01), rel


def test_emd_sinkhorn_identical_clouds_near_zero_and_unequal_sizes():
    x = torch.rand(2, 100, 3, generator=_gen(8))
    assert torch.all(emd_sinkhorn(x, x.clone()) < 1e-3)
    y = torch.rand(2, 150, 3, generator=_gen(9))
    assert torch.all(emd_sinkhorn(x, y) > 0)


# ---------------------------------------------------------------------------------------------------------------
# all pairs and set scores
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cd", "emd_exact"])
def test_pairwise_matches_direct_calls_and_symmetric_mode(metric):
    a = torch.rand(5, 20, 3, generator=_gen(10))
    b = torch.rand(4, 20, 3, generator=_gen(11))
    fn = chamfer_distance if metric == "cd" else emd_exact
    d = pairwise_distances(a, b, metric, batch_size=3)
    want = torch.stack([fn(a[i : i + 1].expand(4, -1, -1), b)[:] for i in range(5)])
    torch.testing.assert_close(d, want)
    # refs is samples -> triangle only; must equal the full computation on a copy
    d_self = pairwise_distances(a, a, metric, batch_size=2)
    torch.testing.assert_close(d_self, pairwise_distances(a, a.clone(), metric, batch_size=7), rtol=1e-5, atol=1e-7)
    assert torch.all(d_self.diagonal() == 0)


def test_pairwise_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_distances(torch.rand(2, 4, 3), torch.rand(2, 4, 3), metric="hausdorff")


def test_mmd_cov_hand_made():
    d = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.5, 4.0]])  # 2 samples x 3 refs
    res = mmd_cov(d)
    assert res["mmd"] == pytest.approx((1.0 + 0.5 + 3.0) / 3)  # min over samples, per reference
    assert res["cov"] == pytest.approx(2 / 3)  # refs 0 and 1 are matched, ref 2 is not
    assert res["mmd_smp"] == pytest.approx((1.0 + 0.5) / 2)
    # every sample picks the same reference -> coverage 1/R
    assert mmd_cov(torch.tensor([[0.1, 1.0, 2.0], [0.2, 3.0, 4.0]]))["cov"] == pytest.approx(1 / 3)


def test_one_nn_accuracy_hand_made():
    eye_like = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    far = torch.full((2, 2), 5.0)
    near = torch.full((2, 2), 0.1)
    assert one_nn_accuracy(eye_like, far, eye_like) == 1.0  # two separated clusters
    assert one_nn_accuracy(eye_like, near, eye_like) == 0.0  # each nearest neighbour is in the other set
    # s0's neighbour is r0 (wrong), s1's is s0 (right), r0's is s0 (wrong), r1's is r0 (right) -> 0.5
    d_ss = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    d_sr = torch.tensor([[1.0, 9.0], [9.0, 9.0]])
    d_rr = torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    assert one_nn_accuracy(d_ss, d_sr, d_rr) == 0.5
    # tie: s0 is equally close to s1 and r0 -> the sample (lower index) wins; 3 of 4 correct
    d_sr_tie = torch.tensor([[2.0, 9.0], [9.0, 9.0]])
    assert one_nn_accuracy(d_ss, d_sr_tie, d_rr) == 0.75
    # unequal set sizes
    assert one_nn_accuracy(torch.zeros(1, 1), torch.tensor([[4.0, 4.0]]), eye_like) == pytest.approx(2 / 3)


def test_same_distribution_gives_chance_level_1nna_and_high_coverage():
    samples = _ellipsoids(100, 64, seed=20)
    refs = _ellipsoids(100, 64, seed=21)
    d_sr = pairwise_distances(samples, refs, "cd")
    d_ss = pairwise_distances(samples, samples, "cd")
    d_rr = pairwise_distances(refs, refs, "cd")
    acc = one_nn_accuracy(d_ss, d_sr, d_rr)
    assert 0.35 <= acc <= 0.65, acc  # chance level 0.5; sd ~0.035 for 200 clouds
    assert mmd_cov(d_sr)["cov"] >= 0.45  # ~1 - 1/e ≈ 0.63 for matched distributions


def test_disjoint_families_are_fully_separated():
    samples = _ellipsoids(30, 48, seed=30)
    refs = _boxes(30, 48, seed=31)
    for metric in ("cd", "emd_exact"):
        d_sr = pairwise_distances(samples, refs, metric)
        d_ss = pairwise_distances(samples, samples, metric)
        d_rr = pairwise_distances(refs, refs, metric)
        assert one_nn_accuracy(d_ss, d_sr, d_rr) == 1.0


def test_copy_of_itself_gives_full_coverage_and_zero_mmd():
    samples = _ellipsoids(20, 64, seed=40)
    for metric in ("cd", "emd_exact"):
        res = mmd_cov(pairwise_distances(samples, samples.clone(), metric))
        assert res["cov"] == 1.0
        assert res["mmd"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# JSD
# ---------------------------------------------------------------------------------------------------------------


def _jsd_reference(a: torch.Tensor, b: torch.Tensor, res: int) -> float:
    """Straightforward version: brute-force nearest kept grid point, entropies in bits."""
    steps = torch.arange(res, dtype=torch.float64) / (res - 1) - 0.5
    grid = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[grid.norm(dim=1) <= 0.5]

    def hist(pcs):
        idx = torch.cdist(pcs.reshape(-1, 3).double(), grid).argmin(1)
        h = torch.bincount(idx, minlength=len(grid)).double()
        return h / h.sum()

    def entropy(p):
        p = p[p > 0]
        return -(p * torch.log2(p)).sum().item()

    p, q = hist(a), hist(b)
    return entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2


def test_jsd_matches_brute_force_grid_assignment():
    g = _gen(50)
    a = torch.rand(3, 400, 3, generator=g) - 0.5  # fills the cube, corners included (clipped cells)
    b = _ellipsoids(3, 400, seed=51) * 1.3
    assert jsd_between_sets(a, b, resolution=12) == pytest.approx(_jsd_reference(a, b, 12), abs=1e-9)


def test_jsd_properties():
    a = _ellipsoids(40, 2048, seed=60)
    b = _ellipsoids(40, 2048, seed=61)
    c = _boxes(40, 2048, seed=62)
    assert jsd_between_sets(a, a) == pytest.approx(0.0, abs=1e-12)
    assert jsd_between_sets(a, b) == pytest.approx(jsd_between_sets(b, a), abs=1e-12)
    assert jsd_between_sets(a, c) == pytest.approx(jsd_between_sets(c, a), abs=1e-12)
    # same family: small (sampling noise only, ~0.03 here); different family: much larger
    assert 0.0 < jsd_between_sets(a, b) < 0.1
    assert jsd_between_sets(a, c) > 0.5
    left = 0.1 * _ellipsoids(5, 200, seed=62, center=(-2.5, 0.0, 0.0))  # around x = -0.25
    right = 0.1 * _ellipsoids(5, 200, seed=63, center=(2.5, 0.0, 0.0))  # around x = +0.25
    assert jsd_between_sets(left, right) == pytest.approx(1.0, abs=1e-9)


def test_jsd_warns_outside_unit_cube():
    with pytest.warns(UserWarning, match="unit cube"):
        jsd_between_sets(torch.full((1, 4, 3), 0.9), torch.zeros(1, 4, 3))


# ---------------------------------------------------------------------------------------------------------------
# everything together
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("emd", ["approxmatch", "exact", "sinkhorn", "none"])
def test_compute_all_metrics_keys_and_values(emd):
    samples = _ellipsoids(4, 32, seed=70)
    refs = _ellipsoids(5, 32, seed=71)
    res = compute_all_metrics(samples, refs, batch_size=4, emd=emd)
    keys = {"MMD-CD", "COV-CD", "1-NNA-CD", "JSD"}
    if emd != "none":
        keys |= {"MMD-EMD", "COV-EMD", "1-NNA-EMD"}
    assert set(res) == keys
    assert all(isinstance(v, float) and math.isfinite(v) for v in res.values())
    assert all(0.0 <= res[k] <= 1.0 for k in keys if not k.startswith("MMD"))
    assert all(res[k] > 0 for k in keys if k.startswith("MMD"))


def test_compute_all_metrics_uses_approxmatch_by_default():
    samples, refs = _ellipsoids(4, 48, seed=72), _ellipsoids(4, 48, seed=73)
    default = compute_all_metrics(samples, refs, batch_size=4)
    assert default == compute_all_metrics(samples, refs, batch_size=4, emd="approxmatch")
    assert default["MMD-EMD"] != compute_all_metrics(samples, refs, batch_size=4, emd="exact")["MMD-EMD"]


def test_compute_all_metrics_rejects_unknown_emd():
    with pytest.raises(ValueError, match="emd must be"):
        compute_all_metrics(torch.rand(2, 8, 3), torch.rand(2, 8, 3), emd="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a = _ellipsoids(3, 128, seed=80)
    b = _ellipsoids(3, 128, seed=81)
    for fn in (chamfer_distance, emd_approxmatch, emd_exact, emd_sinkhorn):
        out = fn(a.cuda(), b.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), fn(a, b), rtol=1e-3, atol=1e-5)
