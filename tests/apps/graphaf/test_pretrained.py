"""The QM9 GraphAF shipped in data/pretrained/graphaf-qm9 loads from the repository and samples valid molecules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rdkit import Chem

from apps.graphaf.chem import canonical_smiles, graph_to_mol
from apps.graphaf.commands import generate_smiles
from core.paths import REPO_ROOT
from core.training import restore

PRETRAINED = REPO_ROOT / "data" / "pretrained" / "graphaf-qm9"


def test_shipped_model_is_small_and_documented():
    ckpt = PRETRAINED / "model.ckpt"
    assert ckpt.is_file() and ckpt.stat().st_size < 5 * 2**20
    card = (PRETRAINED / "MODEL_CARD.md").read_text()
    for needed in ("validity", "uniqueness", "novelty", "reconstruction", "python -m apps.graphaf evaluate"):
        assert needed in card


def test_shipped_model_samples_valid_molecules():
    restored = restore(PRETRAINED, app="graphaf")
    model = restored.module.eval_model.eval()
    assert model.vocab.tokens == ("C", "N", "O", "F") and model.max_atoms == 9
    assert Path(restored.cfg.data.path).as_posix().endswith("data/graphaf/qm9.csv")  # ships with the repository
    torch.manual_seed(0)
    graphs = model.generate(128, temperature=0.75)
    mols = [graph_to_mol(g.types, g.bonds, model.vocab) for g in graphs]
    assert all(m is not None for m in mols)  # the valency check
    smiles = {canonical_smiles(m) for m in mols}
    assert len(smiles) > 100  # a trained model: diverse molecules, not a few repeated ones
    assert sum(m.GetNumAtoms() for m in mols) / len(mols) > 7  # QM9-sized (an untrained model stops after 2-3 atoms)


def test_min_atoms_discards_small_molecules_and_draws_again():
    """DIG's protocol (num_min_node=7): molecules under min_atoms heavy atoms are not counted, others replace them."""
    model = restore(PRETRAINED, app="graphaf").module.eval_model.eval()
    torch.manual_seed(0)
    smiles, valid, _, rejected = generate_smiles(model, 96, 64, 0.75, True, "test", min_atoms=8)
    assert len(smiles) == len(valid) == 96 and all(valid)
    assert rejected > 0  # this model draws molecules of 1-7 atoms too (a quarter of them at min_atoms=7)
    assert min(Chem.MolFromSmiles(s).GetNumAtoms() for s in smiles) >= 8
    with pytest.raises(ValueError, match="min_atoms=10"):
        generate_smiles(model, 4, 4, 0.75, True, "test", min_atoms=10)


def test_incremental_sampling_gives_the_molecules_of_full_recomputation():
    """generate recomputes the R-GCN only for molecules whose graph gained a bond: the same molecules as recomputing
    every graph at every step (same noise)."""
    model = restore(PRETRAINED, app="graphaf").module.eval_model.eval()
    runs = []
    for incremental in (True, False):
        model.incremental_sampling = incremental
        torch.manual_seed(1)
        runs.append([(g.types.tolist(), g.bonds.tolist()) for g in model.generate(256, temperature=0.75)])
    model.incremental_sampling = True
    assert runs[0] == runs[1]
    assert sum(len(t) for t, _ in runs[0]) / 256 > 6  # real molecules, not stopped after one or two atoms
