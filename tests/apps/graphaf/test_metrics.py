"""Molecule metrics on hand-made sets with known answers."""

from __future__ import annotations

import numpy as np
from rdkit import Chem
from rdkit.Chem import Crippen

from apps.graphaf.chem import penalized_logp, sa_score
from apps.graphaf.metrics import generation_metrics, property_metrics, property_table


def test_validity_uniqueness_novelty_on_a_hand_made_set():
    generated = ["CCO", "OCC", "c1ccccc1", "C1=CC=CC=C1", "CC(C)(C)(C)C", "not smiles", None, "N"]
    m = generation_metrics(generated, training=["CCO", "N"])
    # valid: CCO, OCC(=CCO), benzene x2 (aromatic and Kekule), N -> 5 of 8 (pentavalent C and junk invalid)
    assert m["n"] == 8 and m["validity"] == 5 / 8
    assert m["uniqueness"] == 3 / 5  # CCO, c1ccccc1, N
    assert m["novelty"] == 2 / 5  # the two benzenes
    assert m["novelty_unique"] == 1 / 3


def test_properties_and_penalized_logp():
    cyclooctane = Chem.MolFromSmiles("C1CCCCCCC1")
    raw = Crippen.MolLogP(cyclooctane) - sa_score(cyclooctane) - 2
    assert abs(penalized_logp(cyclooctane, normalized=False) - raw) < 1e-9
    logp, sa = Crippen.MolLogP(cyclooctane), sa_score(cyclooctane)
    z = (logp - 2.4571) / 1.4343 + (3.0526 - sa) / 0.8335 + (0.0486 - 2) / 0.2860
    assert abs(penalized_logp(cyclooctane) - z) < 1e-2, "GCPN's z-scored form (ZINC250k statistics)"
    benzene = Chem.MolFromSmiles("c1ccccc1")
    assert abs(penalized_logp(benzene, normalized=False) - (Crippen.MolLogP(benzene) - sa_score(benzene))) < 1e-9
    assert 1.0 <= sa_score(benzene) < 2.0  # simple molecules are easy to make
    t = property_table(["CCO", "xx", "c1ccccc1"])
    assert all(len(v) == 2 for v in t.values()) and 0 < t["qed"].min() <= t["qed"].max() < 1
    same = property_metrics(t, t)
    assert same["qed_w1"] == 0.0 and same["sa_w1"] == 0.0 and np.isclose(same["plogp_mean"], same["plogp_ref_mean"])
    shifted = property_metrics(t, {k: v + 1.0 for k, v in t.items()})
    assert np.isclose(shifted["sa_w1"], 1.0)
