"""Chemistry for GraphAF: atom vocabularies, valences, SMILES <-> kekulized graphs, BFS orders, properties.

A molecule is a graph of heavy atoms: ``types`` (n,) indices into an :class:`AtomVocab` and ``bonds`` (m, 3)
rows ``(u, v, bond)`` with ``bond`` in 0 single, 1 double, 2 triple (kekulized: no aromatic bonds). Hydrogens are
implicit and follow from the atom, its formal charge and its bonds, so the graph rebuilds the molecule exactly;
SMILES are compared in RDKit's canonical form without stereochemistry or isotopes (the graph carries neither).

A vocabulary token is an element with an optional formal charge (``C``, ``N+``, ``O-``): charged atoms are
atom types of their own, so charged molecules (a third of ZINC250k: ammonium, carboxylate, nitro groups) round-trip
exactly. The maximum valence of a token defaults to the paper's table for neutral atoms (C 4, N 3, O 2, F 1, P 5,
S 6, Cl/Br/I 1), RDKit's periodic table for other elements, and the isoelectronic neutral atom for charged ones
(N+ like C: 4, O- like F: 1); ``valence={...}`` overrides any of them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rdkit import Chem, RDConfig, RDLogger
from rdkit.Chem import QED, Crippen

RDLogger.DisableLog("rdApp.*")

__all__ = [
    "BOND_TYPES",
    "NUM_BOND_TYPES",
    "AtomVocab",
    "GraphError",
    "MolGraph",
    "smiles_to_graph",
    "graph_to_mol",
    "graph_to_smiles",
    "canonical_smiles",
    "bfs_order",
    "bandwidth",
    "valid_bfs_starts",
    "qed",
    "sa_score",
    "penalized_logp",
]

BOND_TYPES = (Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE)
NUM_BOND_TYPES = len(BOND_TYPES)  # edge categories are these plus "no bond" (index NUM_BOND_TYPES)
_BOND_INDEX = {b: i for i, b in enumerate(BOND_TYPES)}
BOND_ORDER = np.array([1, 2, 3], dtype=np.int64)

# GraphAF's valence table for neutral atoms (the paper's ZINC250k vocabulary)
PAPER_VALENCE = {"C": 4, "N": 3, "O": 2, "F": 1, "P": 5, "S": 6, "Cl": 1, "Br": 1, "I": 1}
_TOKEN = re.compile(r"^([A-Z][a-z]?)(\+{1,3}|-{1,3}|[+-]\d)?$")


class GraphError(ValueError):
    """A molecule that cannot become a GraphAF graph; ``reason`` is a short category used for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_token(token: str) -> tuple[str, int]:
    """``"N+" -> ("N", 1)``, ``"O-" -> ("O", -1)``, ``"Fe+2" -> ("Fe", 2)``; errors name the bad token."""
    m = _TOKEN.match(token.strip())
    if not m:
        raise ValueError(f"atom token {token!r}: expected an element symbol with an optional charge (C, N+, O-, Fe+2)")
    elem, ch = m.group(1), m.group(2) or ""
    try:
        z = Chem.GetPeriodicTable().GetAtomicNumber(elem)
    except RuntimeError:
        z = -1
    if z <= 0:
        raise ValueError(f"atom token {token!r}: {elem!r} is not an element")
    if not ch:
        return elem, 0
    if ch[-1].isdigit():
        return elem, int(ch)
    return elem, len(ch) * (1 if ch[0] == "+" else -1)


def token_of(element: str, charge: int) -> str:
    if charge == 0:
        return element
    sign = "+" if charge > 0 else "-"
    return element + (sign * abs(charge) if abs(charge) <= 3 else f"{sign}{abs(charge)}")


def _default_valence(element: str, charge: int) -> int:
    pt = Chem.GetPeriodicTable()
    z = pt.GetAtomicNumber(element) - charge  # the isoelectronic neutral atom
    if z <= 0:
        raise ValueError(f"no valence for {token_of(element, charge)}")
    iso = pt.GetElementSymbol(z)
    if iso in PAPER_VALENCE:
        return PAPER_VALENCE[iso]
    valences = [v for v in pt.GetValenceList(z) if v >= 0]
    if not valences:
        raise ValueError(f"RDKit knows no valence for {token_of(element, charge)}; give it in valence={{...}}")
    return max(valences)


@dataclass(frozen=True)
class AtomVocab:
    """Atom types (tokens) and their maximum valences.

    Example:
        >>> v = AtomVocab.from_tokens(["C", "N", "O", "N+"])
        >>> v.index("N+"), v.max_valence[v.index("N+")]
        (3, 4)
    """

    tokens: tuple[str, ...]
    max_valence: tuple[int, ...]

    @classmethod
    def from_tokens(cls, tokens: Sequence[str], valence: dict[str, int] | None = None) -> AtomVocab:
        tokens = tuple(str(t) for t in tokens)
        if not tokens:
            raise ValueError("atom vocabulary is empty")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"atom vocabulary has duplicates: {list(tokens)}")
        valence = dict(valence or {})
        unknown = set(valence) - set(tokens)
        if unknown:
            raise ValueError(f"valence: tokens {sorted(unknown)} are not in the vocabulary {list(tokens)}")
        maxv = tuple(int(valence[t]) if t in valence else _default_valence(*parse_token(t)) for t in tokens)
        return cls(tokens, maxv)

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, token: str) -> int:
        return self.tokens.index(token)

    def element_charge(self, i: int) -> tuple[str, int]:
        return parse_token(self.tokens[i])

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "max_valence": list(self.max_valence)}


@dataclass
class MolGraph:
    """A kekulized heavy-atom graph: ``types`` (n,) int64, ``bonds`` (m, 3) int64 rows (u, v, bond type)."""

    types: np.ndarray
    bonds: np.ndarray

    @property
    def num_atoms(self) -> int:
        return len(self.types)


def mol_tokens(mol: Chem.Mol) -> list[str]:
    return [token_of(a.GetSymbol(), a.GetFormalCharge()) for a in mol.GetAtoms()]


def canonical_smiles(mol_or_smiles: Chem.Mol | str | None) -> str | None:
    """RDKit canonical SMILES without stereo/isotopes; None if RDKit cannot parse or sanitize it."""
    mol = Chem.MolFromSmiles(mol_or_smiles) if isinstance(mol_or_smiles, str) else mol_or_smiles
    if mol is None:
        return None
    try:
        return Chem.MolToSmiles(mol, isomericSmiles=False)
    except Exception:  # noqa: BLE001  (RDKit raises several types on broken molecules)
        return None


def smiles_to_graph(
    smiles: str, vocab: AtomVocab, max_atoms: int, check_roundtrip: bool = True, drop_charges: bool = False
) -> MolGraph:
    """Parse, kekulize and convert; raises :class:`GraphError` with the reason a row is unusable.

    ``drop_charges`` (DIG): a charged atom becomes its element's token; a molecule that had one is not checked
    against the valence table nor round-tripped (its neutral graph can exceed the element's valence)."""
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise GraphError("unparsable", f"RDKit cannot parse {smiles!r}")
    if mol.GetNumAtoms() == 0:
        raise GraphError("empty", "no heavy atoms")
    if mol.GetNumAtoms() > max_atoms:
        raise GraphError("too_large", f"{mol.GetNumAtoms()} heavy atoms > max_atoms={max_atoms}")
    frags = len(Chem.GetMolFrags(mol))
    if frags > 1:
        raise GraphError("disconnected", f"{frags} fragments")
    try:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception as e:  # noqa: BLE001
        raise GraphError("kekulize", str(e)) from None
    types = []
    charged = False
    for a in mol.GetAtoms():
        if a.GetNumRadicalElectrons():
            raise GraphError("radical", f"atom {a.GetIdx()} ({a.GetSymbol()}) has radical electrons")
        charged |= a.GetFormalCharge() != 0
        tok = token_of(a.GetSymbol(), 0 if drop_charges else a.GetFormalCharge())
        if tok not in vocab.tokens:
            raise GraphError("atom_not_in_vocab", f"atom {tok!r} not in {list(vocab.tokens)}")
        types.append(vocab.index(tok))
    bonds = []
    for b in mol.GetBonds():
        if b.GetBondType() not in _BOND_INDEX:
            raise GraphError("bond_type", f"bond {b.GetIdx()} is {b.GetBondType()}")
        u, v = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        bonds.append((min(u, v), max(u, v), _BOND_INDEX[b.GetBondType()]))
    g = MolGraph(np.asarray(types, dtype=np.int64), np.asarray(bonds, dtype=np.int64).reshape(-1, 3))
    val = np.zeros(len(types), dtype=np.int64)
    np.add.at(val, g.bonds[:, 0], BOND_ORDER[g.bonds[:, 2]])
    np.add.at(val, g.bonds[:, 1], BOND_ORDER[g.bonds[:, 2]])
    if drop_charges and charged:
        return g
    over = np.nonzero(val > np.asarray(vocab.max_valence)[g.types])[0]
    if len(over):
        i = int(over[0])
        raise GraphError(
            "valence", f"atom {i} ({vocab.tokens[g.types[i]]}) has valence {val[i]} > {vocab.max_valence[g.types[i]]}"
        )
    if check_roundtrip:
        want, got = canonical_smiles(smiles), graph_to_smiles(g, vocab)
        if got != want:  # e.g. explicit hydrogens that valence rules do not imply ([CH2] carbenes)
            raise GraphError("not_representable", f"graph rebuilds {got!r}, not {want!r}")
    return g


def graph_to_mol(types: Iterable[int], bonds: np.ndarray, vocab: AtomVocab, sanitize: bool = True) -> Chem.Mol | None:
    """Rebuild a molecule; None if RDKit rejects it (sanitization fails: valence, charges)."""
    rw = Chem.RWMol()
    for t in types:
        elem, charge = vocab.element_charge(int(t))
        atom = Chem.Atom(elem)
        atom.SetFormalCharge(charge)
        rw.AddAtom(atom)
    for u, v, b in np.asarray(bonds).reshape(-1, 3):
        rw.AddBond(int(u), int(v), BOND_TYPES[int(b)])
    mol = rw.GetMol()
    if sanitize:
        try:
            Chem.SanitizeMol(mol)
        except Exception:  # noqa: BLE001
            return None
    return mol


def graph_to_smiles(g: MolGraph, vocab: AtomVocab) -> str | None:
    return canonical_smiles(graph_to_mol(g.types, g.bonds, vocab))


# ---- BFS orders ---------------------------------------------------------------------------------------------------
def neighbours(n: int, bonds: np.ndarray) -> list[list[int]]:
    nb: list[list[int]] = [[] for _ in range(n)]
    for u, v, _ in bonds:
        nb[int(u)].append(int(v))
        nb[int(v)].append(int(u))
    return nb


def bfs_order(nb: list[list[int]], start: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Breadth-first order from ``start``; neighbours in random order with ``rng`` (the paper), else ascending."""
    n = len(nb)
    seen = np.zeros(n, dtype=bool)
    order, head = [start], 0
    seen[start] = True
    while head < len(order):
        u = order[head]
        head += 1
        nxt = [v for v in nb[u] if not seen[v]]
        if rng is not None:
            rng.shuffle(nxt)
        else:
            nxt.sort()
        for v in nxt:
            seen[v] = True
            order.append(v)
    if len(order) != n:
        raise GraphError("disconnected", f"BFS from {start} reaches {len(order)} of {n} atoms")
    return np.asarray(order, dtype=np.int64)


def bandwidth(order: np.ndarray, bonds: np.ndarray) -> int:
    """The largest ``|pos(u) - pos(v)|`` over bonds: the edge window (max_edge_unroll) the order needs."""
    if len(bonds) == 0:
        return 0
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))
    return int(np.abs(pos[bonds[:, 0]] - pos[bonds[:, 1]]).max())


def valid_bfs_starts(g: MolGraph, max_edge_unroll: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts whose ascending BFS fits the window, the first such order); GraphError if none does."""
    nb = neighbours(g.num_atoms, g.bonds)
    starts, first = [], None
    for s in range(g.num_atoms):
        order = bfs_order(nb, s)
        if bandwidth(order, g.bonds) <= max_edge_unroll:
            starts.append(s)
            if first is None:
                first = order
    if first is None:
        raise GraphError("edge_unroll", f"no BFS order keeps every bond within max_edge_unroll={max_edge_unroll}")
    return np.asarray(starts, dtype=np.int64), first


# ---- properties ---------------------------------------------------------------------------------------------------
_SASCORER = None


def _sascorer():
    """RDKit Contrib's SA score module (Ertl & Schuffenhauer 2009), shipped in the rdkit wheel."""
    global _SASCORER
    if _SASCORER is None:
        try:
            from rdkit.Contrib.SA_Score import sascorer
        except ImportError:
            path = os.path.join(RDConfig.RDContribDir, "SA_Score")
            if not os.path.isfile(os.path.join(path, "sascorer.py")):
                raise ImportError(f"RDKit's Contrib SA_Score is missing (looked in {path})") from None
            sys.path.append(path)
            import sascorer  # type: ignore[no-redef]
        _SASCORER = sascorer
    return _SASCORER


def qed(mol: Chem.Mol) -> float:
    return float(QED.qed(mol))


def sa_score(mol: Chem.Mol) -> float:
    """Synthetic accessibility, 1 (easy) .. 10 (hard)."""
    return float(_sascorer().calculateScore(mol))


# ZINC250k statistics GCPN (You et al. 2018) z-scores the three terms with; JT-VAE and GraphAF use the same.
_PLOGP_STATS = {"logp": (2.4570953396190123, 1.434324401111988), "sa": (-3.0525811293166134, 0.8335207024513095),
                "cycle": (-0.0485696876403053, 0.2860212110245455)}  # fmt: skip


def penalized_logp(mol: Chem.Mol, normalized: bool = True) -> float:
    """Penalized logP = logP - SA - max(0, largest cycle - 6).

    ``normalized=True`` (default): the form GCPN, JT-VAE and GraphAF report and optimise, each term z-scored with
    ZINC250k statistics and the largest cycle taken from a cycle basis of the molecular graph. ``False``: the
    unnormalised sum with RDKit's smallest set of rings (TorchDrug's convention).
    """
    logp, sa = float(Crippen.MolLogP(mol)), sa_score(mol)
    if not normalized:
        rings = [len(r) for r in mol.GetRingInfo().AtomRings()]
        return logp - sa - max(0, max(rings, default=0) - 6)
    import networkx as nx

    cycles = nx.cycle_basis(nx.Graph(Chem.rdmolops.GetAdjacencyMatrix(mol)))
    cycle = max(0, max((len(c) for c in cycles), default=0) - 6)
    (m_l, s_l), (m_s, s_s), (m_c, s_c) = _PLOGP_STATS["logp"], _PLOGP_STATS["sa"], _PLOGP_STATS["cycle"]
    return (logp - m_l) / s_l + (-sa - m_s) / s_s + (-cycle - m_c) / s_c
