"""GraphAF data: SMILES <-> graph round trips on real molecules, BFS orders, bad rows, the disk cache."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from apps.graphaf.chem import (
    AtomVocab,
    GraphError,
    bandwidth,
    canonical_smiles,
    graph_to_smiles,
    smiles_to_graph,
)
from apps.graphaf.data import DEFAULT_DATA, MoleculeDataset, preprocess, read_smiles, resolve_vocab

HERE = Path(__file__).parent
ZINC = HERE / "zinc250k_sample.csv"  # 300 rows of ../shared/data/molecules/zinc250k_partial.csv (ZINC250k)


def qm9_rows(n: int) -> list[str]:
    return [s for _, s in read_smiles(DEFAULT_DATA)[:n]]


def zinc_rows() -> list[str]:
    return [s for _, s in read_smiles(ZINC)]


def test_round_trip_hundreds_of_real_molecules():
    for rows, max_atoms in ((qm9_rows(400), 9), (zinc_rows(), 38)):
        vocab = AtomVocab.from_tokens(resolve_vocab("auto", rows))
        n = 0
        for s in rows:
            g = smiles_to_graph(s, vocab, max_atoms, check_roundtrip=False)
            assert graph_to_smiles(g, vocab) == canonical_smiles(s), s
            n += 1
        assert n == len(rows) and n >= 300
    # ZINC's charged atoms are tokens of their own
    assert {"N+", "O-"} <= set(resolve_vocab("auto", zinc_rows()))


def test_kekulized_bonds_only():
    vocab = AtomVocab.from_tokens(["C", "N", "O"])
    g = smiles_to_graph("c1ccncc1", vocab, 9)
    assert sorted(np.bincount(g.bonds[:, 2], minlength=3).tolist()) == [0, 3, 3]  # 3 single, 3 double, 0 triple


def test_vocab_valences_and_bad_tokens():
    v = AtomVocab.from_tokens(["C", "N", "O", "P", "S", "N+", "O-"], valence={"P": 5})
    assert dict(zip(v.tokens, v.max_valence)) == {"C": 4, "N": 3, "O": 2, "P": 5, "S": 6, "N+": 4, "O-": 1}
    with pytest.raises(ValueError, match="Xx"):
        AtomVocab.from_tokens(["C", "Xx"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        AtomVocab.from_tokens(["C"], valence={"N": 3})


@pytest.mark.parametrize(
    "smiles,reason",
    [("C1CC", "unparsable"), ("CCCCCCCCCC", "too_large"), ("CCS", "atom_not_in_vocab"), ("C.C", "disconnected")],
)
def test_graph_errors(smiles, reason):
    with pytest.raises(GraphError) as e:
        smiles_to_graph(smiles, AtomVocab.from_tokens(["C", "N", "O"]), 9)
    assert e.value.reason == reason


def test_random_bfs_orders_fit_the_window_and_keep_the_molecule():
    rows = zinc_rows()[:60]
    d = preprocess(ZINC, max_molecules=60, max_edge_unroll=12, cache_dir=False, progress=False)
    vocab = AtomVocab.from_tokens(d.atoms)
    ds = MoleculeDataset(d, range(len(d)), 12, random_order=True)
    for k in range(len(d)):
        g = ds[k]
        assert bandwidth(np.arange(g.num_atoms), g.bonds) <= 12
        assert graph_to_smiles(g, vocab) == canonical_smiles(rows[k])
        # BFS: every atom after the first is bonded to an earlier one
        for i in range(1, g.num_atoms):
            assert ((g.bonds[:, 1] == i) & (g.bonds[:, 0] < i)).any() or (
                (g.bonds[:, 0] == i) & (g.bonds[:, 1] < i)
            ).any()


def _write_csv(path: Path, rows: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "logP"])
        for s in rows:
            w.writerow([s, 0.0])
    return path


def test_bad_rows_are_counted_with_line_numbers(tmp_path, caplog):
    rows = ["CCO", "not_a_smiles", "CCN", "", "CCCCCCCCCCCC", "CS", "C.O", "N#N"]
    path = _write_csv(tmp_path / "mols.csv", rows)
    d = preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=tmp_path / "cache", progress=False)
    assert len(d) == 3 and d.total_rows == 8
    assert d.skipped == {"unparsable": 1, "blank": 1, "too_large": 1, "atom_not_in_vocab": 1, "disconnected": 1}
    # line 1 is the header: "not_a_smiles" is on line 3
    assert d.skipped_lines["unparsable"] == [3] and d.skipped_lines["atom_not_in_vocab"] == [7]
    assert "3 of 8 rows usable" in d.report() and "line(s) 3" in d.report()
    # nothing usable: a clear error naming the file
    bad = _write_csv(tmp_path / "bad.csv", ["xx", "CS"])
    with pytest.raises(ValueError, match="bad.csv: no usable molecule"):
        preprocess(bad, atoms=["C"], max_atoms=9, cache_dir=False, progress=False)


def test_missing_column_and_smi_files(tmp_path):
    path = _write_csv(tmp_path / "mols.csv", ["CCO"])
    with pytest.raises(ValueError, match=r"mols.csv:1: no column 'SMILES'"):
        read_smiles(path, "SMILES")
    smi = tmp_path / "mols.smi"
    smi.write_text("smiles\nCCO ethanol\n\nc1ccccc1\n")
    assert read_smiles(smi) == [(2, "CCO"), (3, ""), (4, "c1ccccc1")]


def test_disk_cache_is_keyed_by_file_and_settings(tmp_path):
    path = _write_csv(tmp_path / "mols.csv", ["CCO", "CCN", "C=O"])
    cache = tmp_path / "cache"
    a = preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=cache, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    b = preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=cache, progress=False)
    assert b.smiles == a.smiles and np.array_equal(b.bonds, a.bonds) and b.skipped == a.skipped
    preprocess(path, atoms=["C", "N", "O"], max_atoms=5, cache_dir=cache, progress=False)  # new settings, new entry
    _write_csv(path, ["CCO", "CCN"])  # new content, new entry
    c = preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=cache, progress=False)
    assert len(c) == 2 and len(list(cache.glob("*.npz"))) == 3
