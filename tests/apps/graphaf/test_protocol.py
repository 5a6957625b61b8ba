"""GraphAF protocol as the reference (DIG): loss per latent dimension, paper settings, novelty against the data set."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from apps.graphaf.data import MoleculeDataModule, graphs_to_batch
from apps.graphaf.model import EDGE_CATEGORIES, GraphAF
from apps.graphaf.module import GraphAFModule
from core.cli import compose


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = GraphAF(["C", "N", "O", "F"], 9, hidden=16, rgcn_layers=2, flow_layers=2, st_hidden=(16,))
    graphs = model.eval().generate(12, temperature=1.0)
    return model, graphs_to_batch(graphs, 9, 4, stop_type=0)


def test_loss_is_nats_per_latent_dimension_as_dig(batch):
    model, b = batch
    module = GraphAFModule(model, optimizer=partial(torch.optim.Adam, lr=1e-3))
    torch.manual_seed(1)
    terms = module.loss_terms(b, model.eval())
    torch.manual_seed(1)
    ll = model.log_likelihood(b["x"], b["adj"], b["num_atoms"])
    nll = -(ll["node"] + ll["edge"])
    # latent dimensions: num_types per node step (the atoms and the stop atom), 4 per edge step
    n = b["num_atoms"]
    node_steps = torch.minimum(n + 1, torch.tensor(9))
    edge_steps = torch.tensor([sum(min(i, 12) for i in range(1, int(k))) for k in node_steps])
    dims = node_steps * 4 + edge_steps * EDGE_CATEGORIES
    torch.testing.assert_close(ll["latent_dims"], dims.float())
    torch.testing.assert_close(terms["nll"], nll.sum() / dims.sum())
    torch.testing.assert_close(module.extra_metrics(b, terms)["nll_molecule"], nll.mean())
    per_molecule = GraphAFModule(model, optimizer=partial(torch.optim.Adam), loss_normalization="molecule")
    torch.manual_seed(1)
    torch.testing.assert_close(per_molecule.loss_terms(b, model)["nll"], nll.mean())
    with pytest.raises(ValueError, match="loss_normalization"):
        GraphAFModule(model, optimizer=partial(torch.optim.Adam), loss_normalization="atom")


def test_paper_experiment_is_digs_protocol():
    cfg = compose("graphaf", "train", ["experiment=paper", "data=zinc250k", "data.path=x.csv"])
    assert cfg.trainer.gradient_clip_val is None  # no clipping of the loss (DIG)
    assert cfg.module.loss_normalization == "latent_dim" and cfg.data.drop_charges is True
    assert cfg.model.rgcn_batch_norm is True and cfg.model.rgcn_normalize is False and cfg.model.st_act == "tanh"
    assert (cfg.model.hidden, cfg.model.flow_layers, cfg.data.batch_size, cfg.data.max_atoms) == (128, 12, 32, 38)
    module_kwargs = GraphAFModule.__init__.__code__.co_varnames
    assert "ema_decay" not in module_kwargs and "kwargs" in module_kwargs  # base arguments pass through


def test_novelty_reference_is_the_whole_data_set(tmp_path):
    path = tmp_path / "mols.smi"
    path.write_text("\n".join(["CCO", "CCN", "C=O", "CC#N", "OCCO", "NCCN", "CCC", "CC(C)O"]) + "\n")
    dm = MoleculeDataModule(str(path), atoms=["C", "N", "O"], max_atoms=9, val_fraction=0.25, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert (
        len(dm.train_smiles) == 6
        and set(dm.reference_smiles) == set(dm.load().smiles)
        and len(dm.reference_smiles) == 8
    )
    assert "all 8 usable molecules" in dm.reference_description and "subset" not in dm.reference_description
    sub = MoleculeDataModule(str(path), atoms=["C", "N", "O"], max_atoms=9, max_molecules=5, cache_dir=str(tmp_path))
    assert "data.max_molecules=5: a subset" in sub.reference_description
