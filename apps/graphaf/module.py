"""The GraphAF FlowModule: NLL per latent dimension (DIG) or per molecule, and generated molecules after validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apps.graphaf.chem import graph_to_smiles
from apps.graphaf.metrics import generation_metrics
from core.training import FlowModule
from core.training.media import log_image, log_table

log = logging.getLogger(__name__)

__all__ = ["GraphAFModule", "draw_grid"]


def draw_grid(smiles: list[str | None], path: Path, per_row: int = 8, legends: list[str] | None = None) -> Path | None:
    """A PNG grid of molecules (RDKit drawing); invalid ones are left out. Returns the path, or None if there is no
    valid molecule or RDKit's drawing cannot load (it needs the system's libXrender: a warning says so; the SMILES
    files are what counts and are written regardless)."""
    from rdkit import Chem

    try:
        from rdkit.Chem import Draw
    except ImportError as err:
        log.warning("no molecule grid %s: RDKit's drawing did not load (%s; apt install libxrender1)", path, err)
        return None

    mols, names = [], []
    for k, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s) if s else None
        if mol is not None:
            mols.append(mol)
            names.append(legends[k] if legends else s)
    if not mols:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Draw.MolsToGridImage(mols, molsPerRow=min(per_row, len(mols)), subImgSize=(200, 200), legends=names)
    img.save(str(path))
    return path


class GraphAFModule(FlowModule):
    """GraphAF's loss and sample logging.

    ``loss_normalization``:
      * ``latent_dim`` (DIG, the paper's code): the training loss is the batch's NLL divided by its number of latent
        dimensions (``num_types`` per node step, 4 per edge step), nats per latent dimension; ``bpd`` is bits per
        latent dimension;
      * ``molecule``: the mean NLL per molecule in nats (hundreds of nats on ZINC), ``bpd`` per generation step.

    Either way ``nll_molecule`` (nats per molecule), ``nll_node``/``nll_edge`` and ``nll_per_step`` are logged beside.
    After validation, ``num_samples`` molecules are generated (valency check on); validity, uniqueness and novelty
    (against every molecule of the data set, see :attr:`MoleculeDataModule.reference_smiles`) and a PNG grid are
    logged. Other arguments (optimizer, scheduler, EMA, ...) go to :class:`core.training.FlowModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_samples: int = 64,
        temperature: float = 0.75,
        loss_normalization: str = "latent_dim",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if loss_normalization not in ("latent_dim", "molecule"):
            raise ValueError(f"module.loss_normalization must be latent_dim or molecule, got {loss_normalization!r}")
        self.num_samples, self.temperature, self.loss_normalization = num_samples, temperature, loss_normalization
        self._dims = 1.0

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        return batch["x"], None

    def num_dims(self, x: Tensor) -> int:
        return max(self._dims, 1.0)

    def loss_terms(self, batch: Any, model: nn.Module) -> dict[str, Tensor]:
        ll = model.log_likelihood(batch["x"], batch["adj"], batch["num_atoms"])
        nll = -(ll["node"] + ll["edge"])  # (B,) nats per molecule
        steps = ll["steps"].mean()
        self._parts = {
            "nll_molecule": nll.mean().detach(),
            "nll_node": -ll["node"].mean().detach(),
            "nll_edge": -ll["edge"].mean().detach(),
            "nll_per_step": nll.mean().detach() / steps,
        }
        if self.loss_normalization == "latent_dim":
            self._dims = 1.0
            return {"nll": nll.sum() / ll["latent_dims"].sum()}
        self._dims = float(steps)
        return {"nll": nll.mean()}

    def extra_metrics(self, batch: Any, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(self._parts)

    @torch.no_grad()
    def log_samples(self) -> None:
        if not self.num_samples:
            return
        model = self.eval_model
        was_training = model.training
        model.eval()
        graphs = model.generate(self.num_samples, temperature=self.temperature)
        model.train(was_training)
        smiles = [graph_to_smiles(g, model.vocab) for g in graphs]
        dm = getattr(self.trainer, "datamodule", None)
        reference = dm.reference_smiles if dm is not None and hasattr(dm, "reference_smiles") else []
        m = generation_metrics(smiles, reference)
        for k in ("validity", "uniqueness", "novelty"):
            self.log(f"samples/{k}", m[k], rank_zero_only=True)
        path = draw_grid(smiles[:32], self.output_dir / "media" / f"molecules_epoch{self.current_epoch:03d}.png")
        if path is not None:
            log_image(self.trainer, "samples/molecules", path)
        log_table(self.trainer, "samples/smiles", ["smiles"], [[s] for s in smiles if s])
