"""SMILES files -> kekulized graphs in BFS order, cached on disk, batched for teacher-forced training.

Formats: CSV with a header and a configurable SMILES column (ZINC250k ``smiles,logP,qed,SAS``, QM9 ``smiles``), or
``.smi``/``.txt`` with one SMILES per line (the first whitespace-separated field; a header line ``smiles`` or
``SMILES`` is skipped). Rows RDKit cannot parse, or outside the vocabulary / size / edge window, are skipped and
counted by reason with their first line numbers; loading fails only when nothing usable remains.

The preprocessed graphs are cached under ``data/cache/graphaf/`` keyed by the file's SHA-256 and the settings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from apps.graphaf.chem import (
    AtomVocab,
    GraphError,
    MolGraph,
    bandwidth,
    bfs_order,
    canonical_smiles,
    mol_tokens,
    neighbours,
    parse_token,
    smiles_to_graph,
    valid_bfs_starts,
)
from core.paths import REPO_ROOT, resolve_path

__all__ = [
    "DEFAULT_DATA",
    "read_smiles",
    "resolve_vocab",
    "Preprocessed",
    "preprocess",
    "MoleculeDataset",
    "collate",
    "graphs_to_batch",
    "MoleculeDataModule",
]

log = logging.getLogger(__name__)

DEFAULT_DATA = REPO_ROOT / "data" / "graphaf" / "qm9.csv"
DEFAULT_CACHE = REPO_ROOT / "data" / "cache" / "graphaf"
_PREPROCESS_VERSION = 1
_ELEMENT_ORDER = ["C", "N", "O", "F", "P", "S", "Cl", "Br", "I"]


def read_smiles(
    path: str | Path, column: str = "smiles", column_key: str = "data.column", skip_blank: bool = False
) -> list[tuple[int, str]]:
    """``(line number, SMILES)`` rows of a CSV (``column``) or a .smi/.txt file; errors name the file (and
    ``column_key``, the config key that sets the column). ``skip_blank``: leave out rows without a SMILES."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SMILES file {path} does not exist")
    rows: list[tuple[int, str]] = []
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"{path}: empty file, expected a header with a {column!r} column")
                names = [h.strip() for h in header]
                if column not in names:
                    raise ValueError(f"{path}:1: no column {column!r} in the header {names}; set {column_key}=<name>")
                c = names.index(column)
                for rec in reader:
                    rows.append((reader.line_num, rec[c].strip() if c < len(rec) else ""))
        else:
            with path.open(encoding="utf-8") as f:
                for line, text in enumerate(f, start=1):
                    fields = text.split()
                    if line == 1 and fields and fields[0].lower() == "smiles":
                        continue
                    rows.append((line, fields[0] if fields else ""))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a text file of SMILES (CSV with a header, or .smi/.txt): {e}") from e
    if "\0" in "".join(s for _, s in rows[:100]):
        raise ValueError(f"{path}: not a text file of SMILES (it holds NUL bytes)")
    return [(ln, smi) for ln, smi in rows if smi] if skip_blank else rows


def resolve_vocab(atoms: str | Sequence[str], smiles: Sequence[str], formal_charges: bool = True) -> list[str]:
    """``atoms="auto"``: every atom token in the data (elements in the paper's order, then charged forms)."""
    if not isinstance(atoms, str):
        tokens = [str(a) for a in atoms]
        for t in tokens:
            parse_token(t)  # fail early on a typo
        return tokens
    if atoms != "auto":
        raise ValueError(f"data.atoms={atoms!r}: give a list of tokens (C, N, O, N+, ...) or 'auto'")
    from rdkit import Chem

    counts: Counter = Counter()
    for s in tqdm(smiles, desc="atom vocabulary", unit="mol", leave=False):
        mol = Chem.MolFromSmiles(s)
        if mol is not None:
            counts.update(mol_tokens(mol))
    if not formal_charges:
        counts = Counter({t: c for t, c in counts.items() if parse_token(t)[1] == 0})

    def key(t: str) -> tuple:
        elem, charge = parse_token(t)
        rank = _ELEMENT_ORDER.index(elem) if elem in _ELEMENT_ORDER else len(_ELEMENT_ORDER)
        return (charge != 0, rank, elem, charge)

    return sorted(counts, key=key)


@dataclass
class Preprocessed:
    """Graphs of the usable rows, packed: ``types``/``orders`` by ``atom_ptr``, ``bonds`` by ``bond_ptr``,
    valid BFS starts by ``start_ptr``; ``smiles`` canonical; ``skipped`` counts and ``skipped_lines`` examples."""

    types: np.ndarray
    atom_ptr: np.ndarray
    bonds: np.ndarray
    bond_ptr: np.ndarray
    starts: np.ndarray
    start_ptr: np.ndarray
    orders: np.ndarray
    smiles: list[str]
    lines: np.ndarray
    atoms: list[str]
    max_atoms: int
    total_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_lines: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.smiles)

    def graph(self, i: int) -> MolGraph:
        a, b = self.atom_ptr[i], self.atom_ptr[i + 1]
        return MolGraph(self.types[a:b], self.bonds[self.bond_ptr[i] : self.bond_ptr[i + 1]])

    def report(self) -> str:
        kept = len(self)
        lines = [f"{kept} of {self.total_rows} rows usable"]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            first = ", ".join(map(str, self.skipped_lines.get(reason, [])))
            lines.append(f"  skipped {n} ({reason}), first at line(s) {first}")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in ("types", "atom_ptr", "bonds", "bond_ptr", "starts", "start_ptr")}
        meta = {
            "smiles": self.smiles,
            "atoms": self.atoms,
            "max_atoms": self.max_atoms,
            "total_rows": self.total_rows,
            "skipped": self.skipped,
            "skipped_lines": self.skipped_lines,
        }
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, orders=self.orders, lines=self.lines, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Preprocessed:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
        return cls(**arrays, **meta)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_file(cache_dir: str | Path | None, path: Path, digest: str, settings: dict) -> Path:
    key = hashlib.sha256((digest + json.dumps(settings, sort_keys=True)).encode()).hexdigest()[:24]
    return Path(cache_dir or DEFAULT_CACHE) / f"{path.stem}-{key}.npz"


def _load_cache(cache: Path) -> Preprocessed | None:
    """The cached graphs, or None (with a warning naming the file) when the file is unreadable: it is rebuilt."""
    try:
        return Preprocessed.load(cache)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: BadZipFile, KeyError, ValueError, ...)
        log.warning("graph cache %s is unreadable (%s: %s); rebuilding it", cache, type(e).__name__, e)
        return None


def preprocess(
    path: str | Path,
    column: str = "smiles",
    atoms: str | Sequence[str] = "auto",
    max_atoms: int | str = "auto",
    max_edge_unroll: int = 12,
    formal_charges: bool = True,
    valence: dict[str, int] | None = None,
    max_molecules: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    drop_charges: bool = False,
    max_atoms_cap: int = 100,
) -> Preprocessed:
    """Read, convert and cache a SMILES file (see the module docstring); raises if no row is usable.

    ``max_atoms="auto"``: the largest molecule of the file no larger than ``max_atoms_cap`` (larger ones are skipped
    as ``too_large`` and reported). ``drop_charges`` (DIG, the paper's vocabulary): atoms are keyed by element, a
    charged atom becomes its neutral element (its molecule keeps the bonds it had, so e.g. an N+ gives an N with four
    bonds in the training data; the sampler's valency check never emits one). The graphs are cached under the resolved
    settings; a run with ``auto`` settings records an alias to that file, so the resolved config of a checkpoint
    finds the same cache file (one file per data set and settings).
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SMILES file {path} does not exist")
    settings = {
        "v": _PREPROCESS_VERSION,
        "column": column,
        "atoms": atoms if isinstance(atoms, str) else list(atoms),
        "max_atoms": max_atoms,
        "max_edge_unroll": max_edge_unroll,
        "formal_charges": formal_charges,
        "valence": dict(valence or {}),
        "max_molecules": max_molecules,
    }
    if drop_charges:
        settings["drop_charges"] = True
    if max_atoms == "auto":
        settings["max_atoms_cap"] = int(max_atoms_cap)
    cache = alias = digest = None
    if cache_dir is not False:
        digest = _file_hash(path)
        cache = _cache_file(cache_dir, path, digest, settings)
        alias = cache.with_suffix(".alias.json")
        if alias.is_file():  # auto settings resolved before: the resolved file
            try:
                cache = cache.with_name(json.loads(alias.read_text())["file"])
            except (ValueError, KeyError) as e:
                log.warning("graph cache alias %s is unreadable (%s); rebuilding", alias, e)
        if cache.is_file() and (found := _load_cache(cache)) is not None:
            log.info("graphs from cache %s", cache)
            return found
    rows = read_smiles(path, column)
    if max_molecules:
        rows = rows[: int(max_molecules)]
    tokens = resolve_vocab(atoms, [s for _, s in rows if s], formal_charges and not drop_charges)
    valence = dict(valence or {})
    if isinstance(atoms, str):  # auto: valences given for elements the data turns out not to have do not apply
        valence = {t: v for t, v in valence.items() if t in tokens}
    vocab = AtomVocab.from_tokens(tokens, valence)
    if max_atoms == "auto":
        from rdkit import Chem

        sizes = [m.GetNumAtoms() for _, s in rows if s and (m := Chem.MolFromSmiles(s)) is not None]
        limit = max((n for n in sizes if n <= int(max_atoms_cap)), default=1)
        if max(sizes, default=1) > limit:
            log.warning(
                "%s: max_atoms=auto capped at data.max_atoms_cap=%d; %d molecules are larger and skipped (largest %d)",
                path, limit, sum(n > limit for n in sizes), max(sizes),
            )  # fmt: skip
    else:
        limit = int(max_atoms)
    skipped: Counter = Counter()
    examples: dict[str, list[int]] = {}
    kept: list[tuple[int, str, MolGraph, np.ndarray, np.ndarray]] = []
    for line, smi in tqdm(rows, desc=f"graphs from {path.name}", unit="mol", disable=not progress):
        try:
            if not smi:
                raise GraphError("blank", "no SMILES in this row")
            g = smiles_to_graph(smi, vocab, limit, drop_charges=drop_charges)
            starts, order = valid_bfs_starts(g, max_edge_unroll)
        except GraphError as e:
            skipped[e.reason] += 1
            if len(examples.setdefault(e.reason, [])) < 5:
                examples[e.reason].append(line)
            continue
        kept.append((line, canonical_smiles(smi), g, starts, order))
    if not kept:
        detail = "; ".join(f"{r}: {n} (first at lines {examples[r]})" for r, n in skipped.items())
        raise ValueError(f"{path}: no usable molecule among {len(rows)} rows ({detail or 'the file has no rows'})")
    sizes = np.array([g.num_atoms for _, _, g, _, _ in kept])
    nbonds = np.array([len(g.bonds) for _, _, g, _, _ in kept])
    nstarts = np.array([len(s) for _, _, _, s, _ in kept])
    out = Preprocessed(
        types=np.concatenate([g.types for _, _, g, _, _ in kept]),
        atom_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        bonds=np.concatenate([g.bonds for _, _, g, _, _ in kept]).reshape(-1, 3),
        bond_ptr=np.concatenate([[0], np.cumsum(nbonds)]).astype(np.int64),
        starts=np.concatenate([s for _, _, _, s, _ in kept]),
        start_ptr=np.concatenate([[0], np.cumsum(nstarts)]).astype(np.int64),
        orders=np.concatenate([o for _, _, _, _, o in kept]),
        smiles=[s for _, s, _, _, _ in kept],
        lines=np.array([ln for ln, _, _, _, _ in kept], dtype=np.int64),
        atoms=list(vocab.tokens),
        max_atoms=limit,
        total_rows=len(rows),
        skipped=dict(skipped),
        skipped_lines=examples,
    )
    if cache is not None:
        resolved = dict(settings, atoms=list(vocab.tokens), max_atoms=limit, valence=valence)
        resolved.pop("max_atoms_cap", None)
        target = _cache_file(cache_dir, path, digest, resolved)
        out.save(target)
        if target.name != cache.name:
            alias.write_text(json.dumps({"file": target.name}) + "\n")
    return out


class MoleculeDataset(Dataset):
    """Graphs of a :class:`Preprocessed` subset, re-indexed in BFS order.

    ``random_order``: a BFS from a random atom with neighbours in random order, drawn anew at every access (the
    paper); an order whose bonds do not fit the edge window is redrawn (3 tries) and then replaced by a valid
    fixed one. Otherwise the fixed order found in preprocessing (deterministic evaluation).
    """

    def __init__(self, data: Preprocessed, indices: Sequence[int], max_edge_unroll: int, random_order: bool) -> None:
        self.data, self.indices = data, np.asarray(indices, dtype=np.int64)
        self.window, self.random_order = max_edge_unroll, random_order

    def __len__(self) -> int:
        return len(self.indices)

    def order(self, i: int, g: MolGraph) -> np.ndarray:
        d = self.data
        if self.random_order and g.num_atoms > 1:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
            nb = neighbours(g.num_atoms, g.bonds)
            starts = d.starts[d.start_ptr[i] : d.start_ptr[i + 1]]
            for _ in range(3):
                order = bfs_order(nb, int(rng.integers(g.num_atoms)), rng)
                if bandwidth(order, g.bonds) <= self.window:
                    return order
            return bfs_order(nb, int(rng.choice(starts)))
        return d.orders[d.atom_ptr[i] : d.atom_ptr[i + 1]]

    def __getitem__(self, k: int) -> MolGraph:
        i = int(self.indices[k])
        g = self.data.graph(i)
        order = self.order(i, g)
        pos = np.empty_like(order)
        pos[order] = np.arange(len(order))
        bonds = g.bonds.copy()
        bonds[:, :2] = pos[bonds[:, :2]]
        return MolGraph(g.types[order], bonds)


def graphs_to_batch(graphs: Sequence[MolGraph], max_atoms: int, num_types: int, stop_type: int | None = None) -> dict:
    """Pad graphs to a batch: ``x`` (B, L) types (-1 padding) with the stop atom's type at index n (uniformly random,
    or ``stop_type``), ``adj`` (B, L, L) bond categories (3 = none), ``num_atoms`` (B,); L = min(max n + 1, max_atoms).
    """
    b = len(graphs)
    n = torch.tensor([g.num_atoms for g in graphs], dtype=torch.long)
    width = min(int(n.max()) + 1, max_atoms)
    x = torch.full((b, width), -1, dtype=torch.long)
    adj = torch.full((b, width, width), 3, dtype=torch.long)
    for k, g in enumerate(graphs):
        x[k, : g.num_atoms] = torch.from_numpy(g.types)
        if g.num_atoms < width:
            x[k, g.num_atoms] = int(torch.randint(num_types, (1,))) if stop_type is None else stop_type
        if len(g.bonds):
            bt = torch.from_numpy(g.bonds)
            adj[k, bt[:, 0], bt[:, 1]] = bt[:, 2]
            adj[k, bt[:, 1], bt[:, 0]] = bt[:, 2]
    return {"x": x, "adj": adj, "num_atoms": n}


class collate:  # noqa: N801  (a picklable callable for DataLoader workers)
    """DataLoader collate: :func:`graphs_to_batch` with the model's ``max_atoms`` and vocabulary size."""

    def __init__(self, max_atoms: int, num_types: int, stop_type: int | None = None) -> None:
        self.max_atoms, self.num_types, self.stop_type = max_atoms, num_types, stop_type

    def __call__(self, graphs: Sequence[MolGraph]) -> dict:
        return graphs_to_batch(graphs, self.max_atoms, self.num_types, self.stop_type)


class MoleculeDataModule(pl.LightningDataModule):
    """Train/val split of a SMILES file.

    Arguments:
        path: CSV / .smi / .txt of SMILES (relative paths are resolved against the repository too).
        column: the CSV column holding SMILES.
        atoms: vocabulary tokens, or ``auto`` (from the data); ``formal_charges`` keeps charged tokens with auto.
        max_atoms: the largest molecule kept, or ``auto`` (the largest in the file).
        max_edge_unroll: the model's edge window (molecules no BFS order fits are skipped).
        max_molecules: use the first N rows only.
        drop_charges: key atoms by element, charges dropped (DIG; the paper's ZINC250k vocabulary).
        max_atoms_cap: the most ``max_atoms="auto"`` may become (larger molecules are skipped and reported).
        max_batch_memory_gb: refuse, before training, a batch whose dense teacher-forcing tensors would need more
            (the R-GCN runs on every partial graph of the batch at once: about ``batch * steps * L * L`` entries).
    """

    def __init__(
        self,
        path: str = str(DEFAULT_DATA),
        column: str = "smiles",
        atoms: Any = "auto",
        max_atoms: Any = "auto",
        max_edge_unroll: int = 12,
        formal_charges: bool = True,
        valence: dict | None = None,
        max_molecules: int | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 42,
        cache_dir: str | None = None,
        drop_charges: bool = False,
        max_atoms_cap: int = 100,
        max_batch_memory_gb: float | None = None,
    ) -> None:
        super().__init__()
        self.path, self.column = path, column
        self.atoms, self.max_atoms, self.window = atoms, max_atoms, max_edge_unroll
        self.formal_charges, self.valence, self.max_molecules = formal_charges, dict(valence or {}), max_molecules
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self.drop_charges, self.max_atoms_cap = drop_charges, max_atoms_cap
        self.max_batch_memory_gb = max_batch_memory_gb
        self.data: Preprocessed | None = None

    def load(self) -> Preprocessed:
        if self.data is None:
            self.data = preprocess(
                self.path, self.column, self.atoms, self.max_atoms, self.window, self.formal_charges, self.valence,
                self.max_molecules, self.cache_dir, drop_charges=self.drop_charges, max_atoms_cap=self.max_atoms_cap,
            )  # fmt: skip
            log.info("%s: %s", self.path, self.data.report())
            self.check_memory()
        return self.data

    def batch_memory_gb(self) -> float:
        """A lower bound on the memory of one training batch's dense teacher-forcing tensors (float32), in GB: every
        edge step of every molecule is a partial graph of width L with R = 3 relation adjacencies (L x L) and the
        R-GCN's (R, L, 128) activations of 3 layers kept for backward."""
        d = self.load() if self.data is None else self.data
        width = int(d.max_atoms)
        steps = sum(min(i, self.window) for i in range(1, width))
        per_graph = 3 * width * width + 3 * 3 * width * 128
        return self.batch_size * max(steps, 1) * per_graph * 4 / 1e9

    def check_memory(self) -> None:
        """Refuse settings whose batches cannot fit in memory (``max_batch_memory_gb``, default: the machine's RAM)."""
        limit = self.max_batch_memory_gb
        if limit is None:
            try:
                import psutil

                limit = psutil.virtual_memory().total / 1e9
            except ImportError:
                return
        need = self.batch_memory_gb()
        if need > limit:
            raise MemoryError(
                f"{self.path}: a batch of {self.batch_size} molecules of up to max_atoms={self.data.max_atoms} atoms "
                f"needs at least {need:.1f} GB for teacher forcing (limit {limit:.1f} GB); lower data.max_atoms, "
                "data.max_atoms_cap or data.batch_size"
            )

    def prepare_data(self) -> None:
        self.load()  # fills the disk cache once, on rank zero

    def setup(self, stage: str | None = None) -> None:
        d = self.load()
        perm = np.random.default_rng(self.split_seed).permutation(len(d))
        n_val = int(round(self.val_fraction * len(d))) if len(d) > 1 else 0
        self.val_idx, self.train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.train_set = MoleculeDataset(d, self.train_idx, self.window, random_order=True)
        self.val_set = MoleculeDataset(d, self.val_idx, self.window, random_order=False)

    @property
    def train_smiles(self) -> list[str]:
        d = self.load()
        return [d.smiles[i] for i in self.train_idx]

    @property
    def reference_smiles(self) -> list[str]:
        """Canonical SMILES of every usable molecule of the data set, training and validation split alike: novelty is
        measured against these, as DIG's ``RandGenEvaluator`` does against the whole data set."""
        return list(self.load().smiles)

    @property
    def reference_description(self) -> str:
        """What :attr:`reference_smiles` holds, for metrics JSONs (says so when ``max_molecules`` took a subset)."""
        d = self.load()
        text = f"all {len(d)} usable molecules of {self.path}"
        if self.max_molecules and d.total_rows >= int(self.max_molecules):
            text += (
                f" within its first {self.max_molecules} rows (data.max_molecules={self.max_molecules}: a subset, so"
                " novelty against the whole data set is lower)"
            )
        return text

    def _loader(self, ds: Dataset, batch: int, shuffle: bool, stop_type: int | None) -> DataLoader:
        d = self.load()
        return DataLoader(
            ds, batch_size=batch, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=collate(d.max_atoms, len(d.atoms), stop_type), persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, None)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False, 0)
