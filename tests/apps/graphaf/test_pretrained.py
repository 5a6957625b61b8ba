"""The QM9 GraphAF shipped in data/pretrained/graphaf-qm9 loads from the repository and samples valid molecules."""

from __future__ import annotations

from pathlib import Path

import torch

from apps.graphaf.chem import canonical_smiles, graph_to_mol
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
