"""GraphAF model: teacher forcing equals step-by-step likelihood, exact reconstruction, the valency check."""

from __future__ import annotations

import pytest
import torch

from apps.graphaf.chem import canonical_smiles, graph_to_mol, graph_to_smiles
from apps.graphaf.data import MoleculeDataset, graphs_to_batch, preprocess
from apps.graphaf.model import EDGE_CATEGORIES, NO_BOND, GraphAF
from tests.apps.graphaf.test_chem_data import ZINC


@pytest.fixture(scope="module")
def zinc():
    d = preprocess(ZINC, max_molecules=120, cache_dir=False, progress=False)
    return d, MoleculeDataset(d, range(len(d)), 12, random_order=False)


def random_model(atoms, max_atoms, seed=0, **kw) -> GraphAF:
    torch.manual_seed(seed)
    model = GraphAF(atoms, max_atoms, hidden=16, rgcn_layers=2, flow_layers=2, st_hidden=(16,), **kw).double()
    with torch.no_grad():  # away from the identity initialisation of the flows
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def reference_rgcn(rgcn, types: list[int], edges: list[tuple[int, int, int]], normalize: bool) -> torch.Tensor:
    """The paper's Eq. 6 node by node, as DIG writes it: sum_r act(sum_j (A_r + I)_ij norm h_j W_r), then the
    batch-norm (eval: running statistics) of every atom present."""
    n, rels = len(types), rgcn.num_relations
    a = torch.zeros(rels, n, n, dtype=torch.float64)
    for u, v, r in edges:
        a[r, u, v] = a[r, v, u] = 1.0
    a = a + torch.eye(n, dtype=torch.float64)
    if normalize:
        d = a.sum(-1).rsqrt()
        a = d.unsqueeze(-1) * a * d.unsqueeze(-2)
    h = torch.nn.functional.one_hot(torch.tensor(types), rgcn.num_types).double() @ rgcn.embed.weight[:-1]
    for k, w in enumerate(rgcn.weights):
        out = torch.zeros(n, w.shape[-1], dtype=torch.float64)
        for r in range(rels):
            m = torch.stack([sum(a[r, i, j] * h[j] for j in range(n)) for i in range(n)]) @ w[r]
            out = out + (torch.relu(m) if k < len(rgcn.weights) - 1 else m)
        h = out
    bn = rgcn.norm
    return (h - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias


@pytest.mark.parametrize("normalize", [False, True])
def test_rgcn_is_the_papers_equation_6_and_ignores_padding(normalize):
    torch.manual_seed(0)
    model = random_model(["C", "N", "O"], 9, rgcn_normalize=normalize)
    rgcn = model.rgcn
    with torch.no_grad():  # non-trivial running statistics
        rgcn.norm.running_mean.normal_()
        rgcn.norm.running_var.uniform_(0.5, 2.0)
    types = [0, 1, 2, 0]
    edges = [(0, 1, 0), (1, 2, 1), (2, 3, 2), (0, 3, 0)]
    want = reference_rgcn(rgcn, types, edges, normalize)
    for pad in (0, 3):  # the same graph padded with absent atoms gives the same embeddings and sum
        x = torch.tensor([types + [-1] * pad])
        adj = torch.full((1, 4 + pad, 4 + pad), NO_BOND)
        for u, v, r in edges:
            adj[0, u, v] = adj[0, v, u] = r
        h, hg = rgcn(x, adj)
        torch.testing.assert_close(h[0, :4], want)
        assert (h[0, 4:] == 0).all()
        torch.testing.assert_close(hg[0], want.sum(0))


def sequential_log_likelihood(model: GraphAF, g, stop_type: int = 0) -> torch.Tensor:
    """The likelihood step by step on explicitly built partial graphs (an independent path through the R-GCN)."""
    n, w, m = g.num_atoms, model.window, model.max_atoms
    x = torch.full((1, m), -1, dtype=torch.long)
    x[0, :n] = torch.from_numpy(g.types)
    if n < m:
        x[0, n] = stop_type
    adj = torch.full((1, m, m), NO_BOND, dtype=torch.long)
    for u, v, b in g.bonds:
        adj[0, u, v] = adj[0, v, u] = int(b)
    total = torch.zeros((), dtype=torch.float64)

    def lp(flow, cat, ctx, k):
        y = (torch.nn.functional.one_hot(torch.tensor([cat]), k).double() + 0.5) / 2
        z, ld = flow.transform(y, ctx)
        return flow.base.log_prob(z) + ld - k * torch.log(torch.tensor(2.0, dtype=torch.float64))

    for i in range(min(n + 1, m)):  # every atom, then the stop atom (its type, then "no bond" to the window)
        ctx = torch.zeros(1, model.rgcn.hidden, dtype=torch.float64)
        if i:
            ctx = model.rgcn(x[:, :i], adj[:, :i, :i])[1]
        total = total + lp(model.node_flow, int(x[0, i]), ctx, model.num_types)[0]
        part = adj[:, : i + 1, : i + 1].clone()
        part[0, i, :] = NO_BOND
        part[0, :, i] = NO_BOND
        for j in range(max(0, i - w), i):
            h, hg = model.rgcn(x[:, : i + 1], part)
            ctx = torch.cat([hg, h[:, i], h[:, j]], -1)
            total = total + lp(model.edge_flow, int(adj[0, i, j]), ctx, EDGE_CATEGORIES)[0]
            part[0, i, j] = part[0, j, i] = adj[0, i, j]
    return total


def test_teacher_forcing_equals_step_by_step_likelihood(zinc):
    d, ds = zinc
    model = random_model(d.atoms, d.max_atoms, max_edge_unroll=12)
    graphs = [ds[k] for k in (0, 5, 17)]  # different sizes: padding inside the batch
    batch = graphs_to_batch(graphs, model.max_atoms, model.num_types, stop_type=0)
    with torch.no_grad():
        ll = model.log_likelihood(batch["x"], batch["adj"], batch["num_atoms"], center=True)
        expected = torch.stack([sequential_log_likelihood(model, g) for g in graphs])
    torch.testing.assert_close(ll["node"] + ll["edge"], expected, rtol=1e-9, atol=1e-8)
    # steps: the node steps of the n atoms and of the stop atom, and the edge steps of atoms 1..n (n: the stop atom)
    g = graphs[0]
    n = g.num_atoms
    want = min(n + 1, d.max_atoms) + sum(min(i, 12) for i in range(1, min(n + 1, d.max_atoms)))
    assert int(ll["steps"][0]) == want


def test_reconstruction_is_exact_for_a_random_model(zinc):
    d, ds = zinc
    model = random_model(d.atoms, d.max_atoms)
    graphs = [ds[k] for k in range(80)]
    batch = graphs_to_batch(graphs, model.max_atoms, model.num_types, stop_type=0)
    latents = model.encode(batch["x"], batch["adj"], batch["num_atoms"])
    decoded = model.generate(0, latents=latents, valency_check=False)
    assert len(decoded) == len(graphs) == 80
    for g, h in zip(graphs, decoded):
        assert graph_to_smiles(h, model.vocab) == graph_to_smiles(g, model.vocab)
        assert (h.types == g.types).all()


@pytest.mark.parametrize("atoms,max_atoms", [(["C", "N", "O", "F"], 9), (None, 38)])
def test_valency_check_never_emits_a_molecule_rdkit_rejects(zinc, atoms, max_atoms):
    d, _ = zinc
    model = random_model(atoms or d.atoms, max_atoms, seed=3).float()
    torch.manual_seed(1)
    graphs = model.generate(200, temperature=1.0, valency_check=True)
    assert all(graph_to_mol(g.types, g.bonds, model.vocab) is not None for g in graphs)
    assert sum(g.num_atoms > 1 for g in graphs) > 20  # not trivially valid single atoms
    for g in graphs:  # connected, within size
        assert g.num_atoms <= max_atoms
        smi = canonical_smiles(graph_to_mol(g.types, g.bonds, model.vocab))
        assert "." not in smi
    # the same model without the check does produce invalid molecules: the check is doing the work
    torch.manual_seed(1)
    raw = model.generate(200, temperature=1.0, valency_check=False)
    assert any(graph_to_mol(g.types, g.bonds, model.vocab) is None for g in raw)


def test_batched_sampling_matches_batch_of_one_in_distribution():
    model = random_model(["C", "N", "O"], 9, seed=2).float()
    torch.manual_seed(0)
    sizes = torch.tensor([g.num_atoms for g in model.generate(400)], dtype=torch.float)
    torch.manual_seed(1)
    single = torch.tensor([model.generate(1)[0].num_atoms for _ in range(50)], dtype=torch.float)
    se = (sizes.var() / len(sizes) + single.var() / len(single)).sqrt()
    assert abs(sizes.mean() - single.mean()) < 4 * se + 1e-6


@pytest.mark.parametrize("normalize", [False, True])
def test_sparse_teacher_forcing_equals_dense(zinc, normalize):
    d, ds = zinc
    model = random_model(d.atoms, d.max_atoms, rgcn_normalize=normalize)
    with torch.no_grad():
        model.rgcn.norm.running_mean.normal_()
        model.rgcn.norm.running_var.uniform_(0.5, 2.0)
    graphs = [ds[k] for k in range(30)]  # sizes from 1 to 38 atoms: padding and missing steps in one batch
    b = graphs_to_batch(graphs, model.max_atoms, model.num_types, stop_type=1)
    out = {}
    for scheme in ("dense", "sparse"):
        model.teacher_forcing = scheme
        out[scheme] = model.log_likelihood(b["x"], b["adj"], b["num_atoms"], center=True)
        step = model.step_log_likelihoods(b["x"], b["adj"], b["num_atoms"])
        out[scheme + "_steps"] = step["edge"][step["edge_mask"]]
    for k in ("node", "edge"):
        torch.testing.assert_close(out["sparse"][k], out["dense"][k], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(out["sparse_steps"], out["dense_steps"], rtol=1e-10, atol=1e-9)
