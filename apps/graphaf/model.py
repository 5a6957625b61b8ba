"""GraphAF (Shi et al. 2020, arXiv:2001.09382): an autoregressive flow over kekulized molecular graphs.

A molecule with atoms in BFS order is generated one atom at a time; after atom ``i`` come the edges to the atoms
``j = max(0, i - W) .. i - 1`` (``W = max_edge_unroll``), each one of {single, double, triple, none}. Every step is a
flow on a dequantized one-hot, conditioned on an R-GCN embedding of the partial graph built so far:

* node step ``i``: ``z = f_node(onehot(type_i) + u ; h(G_<i))`` with ``h`` the sum of the node embeddings;
* edge step ``(i, j)``: ``z = f_edge(onehot(bond_ij) + u ; [h(G), H_i, H_j])`` on the graph with atom ``i`` and
  the edges of ``i`` generated before ``j``.

Training is teacher forced and parallel: all steps of a batch go through the R-GCN at once as masked subgraphs of
the full molecules (:meth:`GraphAF.log_likelihood`). Sampling is sequential and batched over molecules
(:meth:`GraphAF.generate`); with the valency check, a bond that would exceed an atom's valence is resampled.

Stopping: the generator stops when an atom gets no bond to the atoms before it. To learn that, every molecule with
fewer than ``max_atoms`` atoms is followed in training by one "stop" atom whose edges are all "no bond"; its type is
drawn uniformly from the vocabulary (so the stop is learned whatever type the sampler draws). The sampler stops
with probability sum_t P_node(t | G) P(no bonds | t, G); the likelihood keeps the one term of that sum for the
drawn type t (its node step and its "no bond" edge steps), so it is a lower bound on the log-probability of the
molecule under the sampler (and, through dequantization, stochastic), never an overestimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apps.graphaf.chem import BOND_ORDER, NUM_BOND_TYPES, AtomVocab, MolGraph
from core.distributions import FlowModel, StandardNormal
from core.flows import ConditionalAffine, Sequential, StackedConditionalAffine, UniformDequantization

__all__ = ["RGCN", "GraphAF", "StepPlan", "Latents"]

NO_BOND = NUM_BOND_TYPES  # edge category index of "no bond"
EDGE_CATEGORIES = NUM_BOND_TYPES + 1


class RGCN(nn.Module):
    """Relational GCN of the GraphAF paper (Shi et al. 2020, Eq. 6) on dense padded graphs, as DIG implements it.

    ``E = emb(onehot(types))`` (a bias-free linear map of the one-hot, DIG's ``emb``), then per layer

        ``H' = sum_r act(N_r (A_r + I) N_r H W_r)``

    with one bias-free weight ``W_r`` per bond type, the self-loop added in every relation, ``act`` = ReLU on every
    layer but the last (applied per relation before the sum), and ``N_r`` the symmetric degree normalisation
    ``D_r^-1/2`` of the paper's equation with ``normalize=True`` (DIG's default and ours: ``normalize=False``, the
    identity). With ``batch_norm`` (DIG's ``use_bn``) the node embeddings are batch-normalised over the atoms present
    (DIG also normalises its zero padding rows; here padding stays zero, so a graph's embedding does not depend on
    how wide its batch is padded). Returns node embeddings (G, L, d), zero for absent atoms, and their sum (G, d).
    """

    def __init__(
        self,
        num_types: int,
        num_relations: int = NUM_BOND_TYPES,
        hidden: int = 128,
        layers: int = 3,
        normalize: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"GraphAF: rgcn_layers must be >= 1, got {layers}")
        self.num_types, self.num_relations, self.hidden, self.normalize = num_types, num_relations, hidden, normalize
        self.embed = nn.Embedding(num_types + 1, num_types, padding_idx=num_types)
        dims = [num_types] + [hidden] * layers
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_relations, a, b)) for a, b in zip(dims[:-1], dims[1:])]
        )
        for w in self.weights:
            nn.init.xavier_uniform_(w)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else None

    def relation_adjacency(self, adj: Tensor, dtype: torch.dtype) -> Tensor:
        """(G, L, L) bond indices (``num_relations`` = none) -> (G, R, L, L) one adjacency per relation (no loops)."""
        rel = torch.arange(self.num_relations, device=adj.device, dtype=adj.dtype)
        return (adj.unsqueeze(1) == rel.view(1, -1, 1, 1)).to(dtype)

    def forward(self, types: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
        """Dense padded layout: ``types`` (G, L) long, -1 = not in the graph; ``adj`` (G, L, L) with values 0..R-1
        bonds, R = no bond. Returns node embeddings (G, L, d), zero for absent atoms, and their sums (G, d).

        In eval mode the batch-norm is a per-atom affine map, so each graph's embeddings depend on that graph alone
        (sampling relies on it to recompute only the graphs that changed)."""
        g, n = types.shape
        present = types >= 0
        t = torch.where(present, types, self.num_types)
        gi, u, v = torch.triu(adj < self.num_relations, diagonal=1).nonzero(as_tuple=True)
        h = self._propagate(t.reshape(-1), gi * n + u, gi * n + v, adj[gi, u, v]).view(g, n, -1)
        # absent atoms: the zero padding embedding, no bonds, so zero throughout
        if self.norm is not None:
            if not self.norm.training:  # running statistics: a per-atom affine map, padding kept at zero
                h = self.norm(h.reshape(g * n, -1)).view(g, n, -1) * present.unsqueeze(-1)
            else:  # batch statistics over the atoms present only
                flat = h[present]
                h = torch.zeros_like(h).masked_scatter(present.unsqueeze(-1), self.norm(flat)) if len(flat) else h
        return h, h.sum(1)

    def forward_sparse(
        self, types: Tensor, src: Tensor, dst: Tensor, rel: Tensor, graph: Tensor, num_graphs: int
    ) -> tuple[Tensor, Tensor]:
        """The same R-GCN on a batch of graphs as one sparse graph: ``types`` (N,) of the atoms present, bonds
        ``src``/``dst``/``rel`` (E,) (each bond once, either direction), ``graph`` (N,) the graph of each atom.
        Returns node embeddings (N, d) and graph sums (num_graphs, d), equal to :meth:`forward` on the dense layout."""
        h = self._propagate(types, src, dst, rel)
        if self.norm is not None and len(h):
            h = self.norm(h)
        return h, h.new_zeros(num_graphs, h.shape[-1]).index_add(0, graph, h)

    def _propagate(self, types: Tensor, src: Tensor, dst: Tensor, rel: Tensor) -> Tensor:
        """Eq. 6 by message passing: per layer and relation ``(A_r + I) H W_r`` as index_add over the bonds (both
        directions) plus the self-loop, ReLU per relation, summed. Embedding row ``num_types`` is the zero padding."""
        n, r = len(types), self.num_relations
        a_idx, b_idx = src * r + rel, dst * r + rel  # rows of the (N * R, d) per-relation messages
        scale = None
        if self.normalize:  # D^-1/2 (A + I) D^-1/2 with D the degree of A + I, per relation
            deg = torch.ones(n * r, device=types.device, dtype=self.embed.weight.dtype)
            ones = torch.ones_like(a_idx, dtype=deg.dtype)
            deg = deg.index_add(0, a_idx, ones).index_add(0, b_idx, ones)
            scale = deg.rsqrt().view(n, r, 1)
        both_src, both_dst = torch.cat([a_idx, b_idx]), torch.cat([b_idx, a_idx])
        last = len(self.weights) - 1
        h = None
        for k, w in enumerate(self.weights):
            if k == 0:  # embedding then first layer, for every type at once: a table lookup per atom
                hw = torch.einsum("td,rde->tre", self.embed.weight, w)[types]  # (N, R, d)
            else:
                hw = torch.einsum("nd,rde->nre", h, w)  # (N, R, d)
            if scale is not None:
                hw = hw * scale
            flat = hw.reshape(n * r, -1)
            out = flat.index_add(0, both_dst, flat[both_src]).view(n, r, -1)
            if scale is not None:
                out = out * scale
            if k < last:
                out = F.relu(out)
            h = out.sum(1)
        return h


@dataclass
class StepPlan:
    """The teacher-forcing steps of graphs of width L: one per edge step (i, j), shared by every molecule.

    ``node_vis`` (S, L): atoms present at edge step s (0..i); ``edge_vis`` (S, L, L): edges present (all among atoms
    < i, plus the edges (i, j') generated before j); ``first`` (L-1,): the first edge step of atom i = 1..L-1, whose
    graph is the node-step graph of atom i plus atom i alone (an isolated atom changes no other embedding).
    """

    ei: Tensor
    ej: Tensor
    node_vis: Tensor
    edge_vis: Tensor
    first: Tensor

    @classmethod
    def build(cls, width: int, window: int, device: torch.device) -> StepPlan:
        ei, ej, first = [], [], []
        for i in range(1, width):
            first.append(len(ei))
            for j in range(max(0, i - window), i):
                ei.append(i)
                ej.append(j)
        ei_t, ej_t = torch.tensor(ei, dtype=torch.long), torch.tensor(ej, dtype=torch.long)
        pos = torch.arange(width)
        node_vis = pos.view(1, -1) <= ei_t.view(-1, 1)  # (S, L)
        prefix = (pos.view(1, -1, 1) < ei_t.view(-1, 1, 1)) & (pos.view(1, 1, -1) < ei_t.view(-1, 1, 1))
        row = pos.view(1, -1, 1) == ei_t.view(-1, 1, 1)  # u == i
        col = (pos.view(1, 1, -1) < ej_t.view(-1, 1, 1)) & (pos.view(1, 1, -1) >= (ei_t - window).view(-1, 1, 1))
        partial = row & col  # (i, j') with j' in the window, before j
        edge_vis = prefix | partial | partial.transpose(1, 2)
        return cls(
            ei_t.to(device), ej_t.to(device), node_vis.to(device), edge_vis.to(device), torch.tensor(first).to(device)
        )


@dataclass
class Latents:
    """Per-step latents: ``node`` (B, L, K) and ``edge`` (B, L, W, 4) with slot ``i - j - 1`` for edge (i, j)."""

    node: Tensor
    edge: Tensor


class GraphAF(nn.Module):
    """GraphAF: an R-GCN, a node flow and an edge flow (stacks of :class:`ConditionalAffine` on dequantized one-hots).

    Arguments:
        atoms: atom vocabulary tokens (``C``, ``N+``, ...); ``valence`` overrides their maximum valences.
        max_atoms: the largest molecule (sampling stops there).
        max_edge_unroll: the edge window W (bonds only to the W atoms before, in BFS order).
        hidden: R-GCN embedding size; ``rgcn_layers`` its depth; ``rgcn_normalize`` the paper's degree normalisation
            (DIG: off); ``rgcn_batch_norm`` batch-normalised node embeddings (DIG: on). See :class:`RGCN`.
        flow_layers: conditional affine layers per flow; ``st_hidden`` their conditioner MLP sizes and ``st_act`` its
            activation (DIG's ST net: ``tanh``).
        teacher_forcing: how training runs the R-GCN over every step's partial graph: ``sparse`` (only the atoms and
            bonds each step has, one sparse graph; faster, see ``scripts/bench_graphaf.py``) or ``dense`` (every step
            padded to the batch's width L). Same likelihoods; in training mode the batch-norm statistics of
            ``dense`` also count the padding steps past each molecule's end.
    """

    def __init__(
        self,
        atoms: Sequence[str],
        max_atoms: int,
        valence: dict[str, int] | None = None,
        max_edge_unroll: int = 12,
        hidden: int = 128,
        rgcn_layers: int = 3,
        flow_layers: int = 12,
        st_hidden: Sequence[int] = (128,),
        st_act: str = "tanh",
        rgcn_normalize: bool = False,
        rgcn_batch_norm: bool = True,
        teacher_forcing: str = "sparse",
    ) -> None:
        super().__init__()
        if teacher_forcing not in ("sparse", "dense"):
            raise ValueError(f"GraphAF: teacher_forcing must be sparse or dense, got {teacher_forcing!r}")
        self.teacher_forcing = teacher_forcing
        self.vocab = AtomVocab.from_tokens(list(atoms), dict(valence) if valence else None)
        self.max_atoms, self.window = int(max_atoms), int(max_edge_unroll)
        k = len(self.vocab)
        self.rgcn = RGCN(k, NUM_BOND_TYPES, hidden, rgcn_layers, rgcn_normalize, rgcn_batch_norm)
        self.node_flow = FlowModel(
            Sequential([ConditionalAffine(k, hidden, st_hidden, act=st_act) for _ in range(flow_layers)]),
            StandardNormal(k),
        )
        edge_layers = [
            ConditionalAffine(EDGE_CATEGORIES, 3 * hidden, st_hidden, act=st_act) for _ in range(flow_layers)
        ]
        self.edge_flow = FlowModel(
            Sequential(edge_layers),
            StandardNormal(EDGE_CATEGORIES),
        )
        self.dequantize = UniformDequantization(levels=2)  # one-hot + U[0,1)^D, scaled into [0, 1)
        self.register_buffer("max_valence", torch.tensor(self.vocab.max_valence, dtype=torch.long))
        self.register_buffer("bond_order", torch.tensor(list(BOND_ORDER) + [0], dtype=torch.long))
        self._plans: dict[tuple[int, str], StepPlan] = {}

    incremental_sampling = True  # generate: recompute the R-GCN only for graphs that changed (eval mode); tests flip it

    @property
    def num_types(self) -> int:
        return len(self.vocab)

    def plan(self, width: int) -> StepPlan:
        device = self.max_valence.device
        key = (width, str(device))
        if key not in self._plans:
            self._plans[key] = StepPlan.build(width, self.window, device)
        return self._plans[key]

    # ---- density (teacher forcing) ----------------------------------------------------------------------------
    def _contexts(self, x: Tensor, adj: Tensor) -> tuple[Tensor, Tensor, StepPlan]:
        """Node contexts (B, L, d) and edge contexts (B, S, 3d) of every step, in one batched R-GCN pass
        (``teacher_forcing``: sparse, only the steps and atoms each molecule has; dense, every step of width L)."""
        if self.teacher_forcing == "sparse":
            return self._contexts_sparse(x, adj)
        return self._contexts_dense(x, adj)

    def _contexts_sparse(self, x: Tensor, adj: Tensor) -> tuple[Tensor, Tensor, StepPlan]:
        """:meth:`_contexts_dense` without the padding: the partial graph of each step of each molecule (its atoms
        and stop atom only: ``x >= 0``) holds only the atoms and bonds visible at that step, all in one sparse graph.
        Steps past a molecule's stop atom get zero contexts (they are masked out of every likelihood)."""
        b, width = x.shape
        dev, dtype = x.device, self.rgcn.embed.weight.dtype
        plan = self.plan(width)
        s, d = len(plan.ei), self.rgcn.hidden
        node_ctx = torch.zeros(b, width, d, device=dev, dtype=dtype)
        edge_ctx = torch.zeros(b, s, 3 * d, device=dev, dtype=dtype)
        if s == 0:
            return node_ctx, edge_ctx, plan
        present = (x >= 0).sum(1)  # atoms of each molecule, the stop atom included (BFS prefix)
        mol, step = (plan.ei.unsqueeze(0) < present.unsqueeze(1)).nonzero(as_tuple=True)  # (G,) graphs
        if len(mol) == 0:
            return node_ctx, edge_ctx, plan
        gi, gj = plan.ei[step], plan.ej[step]
        counts = gi + 1  # atoms 0..i
        start = torch.cumsum(counts, 0) - counts
        graph = torch.repeat_interleave(torch.arange(len(mol), device=dev), counts)
        pos = torch.arange(len(graph), device=dev) - start[graph]
        types = x[mol[graph], pos]
        # bonds (u < v) of each molecule, padded to the largest count, then those visible at each step's graph
        upper = torch.triu(adj != NO_BOND, diagonal=1)
        bm, bu, bv = upper.nonzero(as_tuple=True)
        nb = torch.bincount(bm, minlength=b)
        if len(bm):
            slot = torch.arange(len(bm), device=dev) - (torch.cumsum(nb, 0) - nb)[bm]
            m = int(nb.max())
            u = torch.full((b, m), width, device=dev, dtype=torch.long)
            v = torch.full((b, m), width, device=dev, dtype=torch.long)
            u[bm, slot], v[bm, slot] = bu, bv
            gu, gv = u[mol], v[mol]  # (G, M)
            vis = (gv < gi.unsqueeze(1)) | ((gv == gi.unsqueeze(1)) & (gu < gj.unsqueeze(1)))
            g_e, k_e = vis.nonzero(as_tuple=True)
            eu, ev = gu[g_e, k_e], gv[g_e, k_e]
            rel = adj[mol[g_e], eu, ev]
            src, dst = start[g_e] + eu, start[g_e] + ev
        else:
            src = dst = rel = torch.zeros(0, device=dev, dtype=torch.long)
        h, hg = self.rgcn.forward_sparse(types, src, dst, rel, graph, len(mol))
        hi, hj = h[start + gi], h[start + gj]
        edge_ctx = edge_ctx.index_put((mol, step), torch.cat([hg, hi, hj], dim=-1))
        first = gj == (gi - self.window).clamp(min=0)  # the first edge step of atom i: i alone, without its bonds
        node_ctx = node_ctx.index_put((mol[first], gi[first]), hg[first] - hi[first])
        return node_ctx, edge_ctx, plan

    def _contexts_dense(self, x: Tensor, adj: Tensor) -> tuple[Tensor, Tensor, StepPlan]:
        """Every step of width L as a dense padded graph: (B * S) graphs of L atoms."""
        b, width = x.shape
        plan = self.plan(width)
        s, d = len(plan.ei), self.rgcn.hidden
        node_ctx = x.new_zeros((b, width, d), dtype=self.max_valence.new_zeros(()).float().dtype)
        node_ctx = node_ctx.to(self.rgcn.embed.weight.dtype)
        if s == 0:  # single-atom graphs only: the first atom is conditioned on the empty graph
            return node_ctx, node_ctx.new_zeros(b, 0, 3 * d), plan
        types = torch.where(plan.node_vis.unsqueeze(0), x.unsqueeze(1), -1)  # (B, S, L)
        edges = torch.where(plan.edge_vis.unsqueeze(0), adj.unsqueeze(1), NO_BOND)  # (B, S, L, L)
        h, hg = self.rgcn(types.reshape(b * s, width), edges.reshape(b * s, width, width))
        h, hg = h.view(b, s, width, d), hg.view(b, s, d)
        steps = torch.arange(s, device=x.device)
        edge_ctx = torch.cat([hg, h[:, steps, plan.ei], h[:, steps, plan.ej]], dim=-1)  # (B, S, 3d)
        atoms = torch.arange(1, width, device=x.device)
        node_ctx = torch.cat([node_ctx[:, :1], hg[:, plan.first] - h[:, plan.first, atoms]], dim=1)
        return node_ctx, edge_ctx, plan

    def _fit_width(self, x: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] > self.max_atoms:
            if (x[:, self.max_atoms :] >= 0).any():
                raise ValueError(f"GraphAF: a molecule has more than max_atoms={self.max_atoms} atoms")
            x, adj = x[:, : self.max_atoms], adj[:, : self.max_atoms, : self.max_atoms]
        return x, adj

    def _masks(self, plan: StepPlan, width: int, num_atoms: Tensor) -> tuple[Tensor, Tensor]:
        pos = torch.arange(width, device=num_atoms.device)
        n = num_atoms.unsqueeze(1)
        node_mask = (pos.unsqueeze(0) < n) | ((pos.unsqueeze(0) == n) & (n < self.max_atoms))  # (B, L), + stop atom
        edge_mask = (plan.ei.unsqueeze(0) < n) | ((plan.ei.unsqueeze(0) == n) & (n < self.max_atoms))  # (B, S)
        return node_mask, edge_mask

    def _step_log_prob(
        self, flow: FlowModel, cats: Tensor, ctx: Tensor, k: int, center: bool = False
    ) -> tuple[Tensor, Tensor]:
        """log p of dequantized one-hots (N,) and the latents (N, k). The noise is uniform (a stochastic lower bound on
        the discrete log-likelihood, in training and validation alike), or 0.5 with ``center`` (for encoding)."""
        one_hot = F.one_hot(cats, k).to(ctx.dtype)
        if center:
            with self.dequantize.centered():
                y, ld = self.dequantize(one_hot)
        else:
            y, ld = self.dequantize(one_hot)
        z, logdet = flow.transform(y, ctx)
        return flow.base.log_prob(z) + logdet + ld, z

    def log_likelihood(self, x: Tensor, adj: Tensor, num_atoms: Tensor, center: bool = False) -> dict[str, Tensor]:
        """Per-molecule log-likelihoods (lower bounds through dequantization) in nats.

        x (B, L) atom types (-1 padding; the stop atom at index n), adj (B, L, L) bond categories (3 = none),
        num_atoms (B,); ``center``: dequantization noise 0.5 instead of uniform (deterministic).
        Returns ``node`` (B,), ``edge`` (B,), ``steps`` (B,) the number of flow steps and ``latent_dims`` (B,) the
        number of latent dimensions (``num_types`` per node step, 4 per edge step).
        """
        x, adj = self._fit_width(x, adj)
        b, width = x.shape
        node_ctx, edge_ctx, plan = self._contexts(x, adj)
        node_mask, edge_mask = self._masks(plan, width, num_atoms)
        node_ll = node_ctx.new_zeros(b, width)
        lp, _ = self._step_log_prob(self.node_flow, x[node_mask], node_ctx[node_mask], self.num_types, center)
        node_ll = node_ll.masked_scatter(node_mask, lp)
        edge_ll = node_ctx.new_zeros(b, len(plan.ei))
        if len(plan.ei):
            cats = adj[:, plan.ei, plan.ej].long()  # (B, S)
            lp, _ = self._step_log_prob(self.edge_flow, cats[edge_mask], edge_ctx[edge_mask], EDGE_CATEGORIES, center)
            edge_ll = edge_ll.masked_scatter(edge_mask, lp)
        node_steps, edge_steps = node_mask.sum(1).to(node_ll.dtype), edge_mask.sum(1).to(node_ll.dtype)
        return {
            "node": node_ll.sum(1),
            "edge": edge_ll.sum(1),
            "steps": node_steps + edge_steps,
            "latent_dims": node_steps * self.num_types + edge_steps * EDGE_CATEGORIES,
        }

    def step_log_likelihoods(self, x: Tensor, adj: Tensor, num_atoms: Tensor, center: bool = True) -> dict[str, Tensor]:
        """Per-step log-likelihoods (differentiable), for policy-gradient fine-tuning on generated graphs.

        Inputs as :meth:`log_likelihood`. Returns ``node`` (B, L) the log p of each atom's type (0 where masked),
        ``edge`` (B, S, 4) the log p of every edge category at every edge step of :meth:`plan` in that step's context
        (the category taken and those the valency check refused), ``node_mask`` (B, L) and ``edge_mask`` (B, S).
        ``node.sum(1)`` plus the taken categories of ``edge`` summed equal :meth:`log_likelihood` with the same
        ``center`` (default: noise 0.5, so a step's value is deterministic).
        """
        x, adj = self._fit_width(x, adj)
        b, width = x.shape
        node_ctx, edge_ctx, plan = self._contexts(x, adj)
        node_mask, edge_mask = self._masks(plan, width, num_atoms)
        lp, _ = self._step_log_prob(self.node_flow, x[node_mask], node_ctx[node_mask], self.num_types, center)
        node = node_ctx.new_zeros(b, width).masked_scatter(node_mask, lp)
        edge = node_ctx.new_zeros(b, len(plan.ei), EDGE_CATEGORIES)
        if len(plan.ei) and edge_mask.any():
            ctx = edge_ctx[edge_mask]  # (N, 3d)
            cats = torch.arange(EDGE_CATEGORIES, device=x.device).repeat(len(ctx))
            lp, _ = self._step_log_prob(
                self.edge_flow, cats, ctx.repeat_interleave(EDGE_CATEGORIES, 0), EDGE_CATEGORIES, center
            )
            edge = edge.masked_scatter(edge_mask.unsqueeze(-1).expand_as(edge), lp)
        return {"node": node, "edge": edge, "node_mask": node_mask, "edge_mask": edge_mask}

    @torch.no_grad()
    def encode(self, x: Tensor, adj: Tensor, num_atoms: Tensor) -> Latents:
        """The latents of every step (dequantization noise 0.5, the cell centre), laid out as :class:`Latents`."""
        x, adj = self._fit_width(x, adj)
        b, width = x.shape
        node_ctx, edge_ctx, plan = self._contexts(x, adj)
        k = self.num_types
        node = node_ctx.new_zeros(b, self.max_atoms, k)
        valid = x >= 0
        _, z = self._step_log_prob(self.node_flow, x[valid], node_ctx[valid], k, center=True)
        node[:, :width] = node[:, :width].masked_scatter(valid.unsqueeze(-1), z)
        edge = node_ctx.new_zeros(b, self.max_atoms, self.window, EDGE_CATEGORIES)
        if len(plan.ei):
            cats = adj[:, plan.ei, plan.ej].long().reshape(-1)
            _, z = self._step_log_prob(
                self.edge_flow, cats, edge_ctx.reshape(-1, edge_ctx.shape[-1]), EDGE_CATEGORIES, center=True
            )
            edge[:, plan.ei, plan.ei - plan.ej - 1] = z.view(b, -1, EDGE_CATEGORIES)
        return Latents(node, edge)

    # ---- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        n: int,
        temperature: float = 0.75,
        valency_check: bool = True,
        max_resample: int = 50,
        latents: Latents | None = None,
        generator: torch.Generator | None = None,
        record: dict | None = None,
    ) -> list[MolGraph]:
        """``n`` molecular graphs, generated together (node, then its edges; stop when a new atom has no bond).

        With ``valency_check`` a bond that would exceed an atom's valence is resampled (fresh noise) up to
        ``max_resample`` times and then set to "no bond". ``latents`` (from :meth:`encode`) replace the noise: the
        inverse of the flow, used for reconstruction.

        ``record`` (a dict, for policy-gradient fine-tuning) receives the actions the returned graphs do not show:
        ``stop_type`` (n,) the type drawn for the atom that stopped generation (-1 if ``max_atoms`` was reached) and
        ``rejected`` (n, max_atoms, W, 3) how often each bond type was drawn and refused by the valency check at edge
        step (i, j), slot ``i - j - 1`` as in :class:`Latents`.
        """
        dev, m, w, k = self.max_valence.device, self.max_atoms, self.window, self.num_types
        dtype = self.rgcn.embed.weight.dtype
        if latents is not None:
            n = latents.node.shape[0]
        x = torch.full((n, m), -1, dtype=torch.long, device=dev)
        adj = torch.full((n, m, m), NO_BOND, dtype=torch.long, device=dev)
        valence = torch.zeros(n, m, dtype=torch.long, device=dev)
        num_atoms = torch.full((n,), m, dtype=torch.long, device=dev)
        active = torch.arange(n, device=dev)
        if record is not None:
            stop_type = torch.full((n,), -1, dtype=torch.long, device=dev)
            rejected = torch.zeros(n, m, w, NUM_BOND_TYPES, dtype=torch.long, device=dev)
        # every flow layer's (shift, log_scale) for a step's context in one batched pass; resampling a refused bond
        # then only redraws noise through the element-wise inverse
        node_flow = StackedConditionalAffine(list(self.node_flow.transform.flows))
        edge_flow = StackedConditionalAffine(list(self.edge_flow.transform.flows))

        def noise(rows: int, dim: int) -> Tensor:
            return temperature * torch.randn(rows, dim, device=dev, dtype=dtype, generator=generator)

        # R-GCN embeddings of each growing molecule's current graph: h (A, m, d) (zero past its atoms) and their sum
        # hg (A, d), recomputed only for the molecules whose graph changed (a bond was added): in eval mode a graph's
        # embeddings depend on that graph alone. Most edge steps draw "no bond", so most rows are reused.
        incremental = not self.rgcn.training and self.incremental_sampling
        d = self.rgcn.hidden
        h = torch.zeros(n, m, d, device=dev, dtype=dtype)
        hg = torch.zeros(n, d, device=dev, dtype=dtype)
        dirty = torch.ones(n, dtype=torch.bool, device=dev)

        def embed(xa: Tensor, adja: Tensor, width: int) -> None:
            rows = dirty.nonzero().squeeze(1) if incremental else torch.arange(len(xa), device=dev)
            if len(rows):
                h_new, hg_new = self.rgcn(xa[rows, :width], adja[rows, :width, :width])
                h[rows, :width], hg[rows] = h_new, hg_new
            dirty.zero_()

        for i in range(m):
            # the molecules still growing, gathered once per atom (xa, adja, vala: (A, ...)), written back after
            xa, adja, vala = x[active], adj[active], valence[active]
            na = len(active)
            if i > 0:
                embed(xa, adja, i)  # the graph of atoms < i
            z = latents.node[active, i] if latents is not None else noise(na, k)
            xa[:, i] = node_flow.inverse(z, *node_flow.params(hg)).argmax(-1)
            if i == 0:
                x[active] = xa
                continue
            dirty.fill_(True)  # atom i joins every graph
            bonded = torch.zeros(na, dtype=torch.bool, device=dev)
            ti = xa[:, i]
            for j in range(max(0, i - w), i):
                embed(xa, adja, i + 1)
                shift, log_scale = edge_flow.params(torch.cat([hg, h[:, i], h[:, j]], dim=-1))
                z = latents.edge[active, i, i - j - 1] if latents is not None else noise(na, EDGE_CATEGORIES)
                e = edge_flow.inverse(z, shift, log_scale).argmax(-1)
                if valency_check:  # free valence left on both atoms (A,)
                    cap = torch.minimum(self.max_valence[ti] - vala[:, i], self.max_valence[xa[:, j]] - vala[:, j])
                    ok = self.bond_order[e] <= cap
                    for attempt in range(max_resample + 1):
                        bad = (~ok).nonzero().squeeze(1)
                        if record is not None and len(bad):
                            ones = torch.ones_like(bad)
                            rejected.index_put_((active[bad], ones * i, ones * (i - j - 1), e[bad]), ones, True)
                        if len(bad) == 0 or attempt == max_resample:
                            break
                        zb = noise(len(bad), EDGE_CATEGORIES)
                        e[bad] = edge_flow.inverse(zb, shift[bad], log_scale[bad]).argmax(-1)
                        ok[bad] = self.bond_order[e[bad]] <= cap[bad]
                    e = torch.where(ok, e, NO_BOND)
                adja[:, i, j] = e
                adja[:, j, i] = e
                o = self.bond_order[e]
                vala[:, i] += o
                vala[:, j] += o
                bond = e != NO_BOND
                bonded |= bond
                dirty |= bond
            x[active], adj[active], valence[active] = xa, adja, vala
            done = active[~bonded]
            if record is not None:
                stop_type[done] = x[done, i]
            x[done, i] = -1
            num_atoms[done] = i
            active = active[bonded]
            h, hg, dirty = h[bonded], hg[bonded], dirty[bonded]
            if len(active) == 0:
                break
        if record is not None:
            record.update(stop_type=stop_type, rejected=rejected)
        return _to_graphs(x.cpu().numpy(), adj.cpu().numpy(), num_atoms.cpu().numpy())


def _to_graphs(x: np.ndarray, adj: np.ndarray, num_atoms: np.ndarray) -> list[MolGraph]:
    out = []
    for b in range(len(x)):
        n = int(num_atoms[b])
        a = adj[b, :n, :n]
        u, v = np.nonzero(np.triu(a != NO_BOND, 1))
        bonds = np.stack([u, v, a[u, v]], axis=1).astype(np.int64) if len(u) else np.zeros((0, 3), dtype=np.int64)
        out.append(MolGraph(x[b, :n].astype(np.int64), bonds))
    return out
