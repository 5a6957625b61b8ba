"""The GraphAF FlowModule: per-molecule NLL (node + edge steps) and generated molecules after validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apps.graphaf.chem import graph_to_smiles
from apps.graphaf.metrics import generation_metrics
from core.training import FlowModule
from core.training.media import log_image, log_table

__all__ = ["GraphAFModule", "draw_grid"]


def draw_grid(smiles: list[str | None], path: Path, per_row: int = 8, legends: list[str] | None = None) -> Path | None:
    """A PNG grid of molecules (RDKit drawing); invalid ones are left out. Returns the path or None if none."""
    from rdkit import Chem
    from rdkit.Chem import Draw

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
    """Loss: ``nll`` = mean over molecules of -(node + edge log-likelihood), nats per molecule.

    ``bpd`` is bits per generation step (node and edge categories); ``nll_node``/``nll_edge`` are logged beside.
    After validation, ``num_samples`` molecules are generated (valency check on) and their validity, uniqueness
    and a PNG grid logged.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        scheduler: Any = None,
        scheduler_interval: str = "step",
        ema_decay: float | None = None,
        sample_every_n_epochs: int = 1,
        num_samples: int = 64,
        temperature: float = 0.75,
    ) -> None:
        super().__init__(model, optimizer, scheduler, scheduler_interval, ema_decay, sample_every_n_epochs)
        self.num_samples, self.temperature = num_samples, temperature
        self._steps = 1.0

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        return batch["x"], None

    def num_dims(self, x: Tensor) -> int:
        return max(self._steps, 1.0)

    def loss_terms(self, batch: Any, model: nn.Module) -> dict[str, Tensor]:
        ll = model.log_likelihood(batch["x"], batch["adj"], batch["num_atoms"])
        self._steps = float(ll["steps"].mean())
        self._parts = {"nll_node": -ll["node"].mean().detach(), "nll_edge": -ll["edge"].mean().detach()}
        return {"nll": -(ll["node"] + ll["edge"]).mean()}

    def extra_metrics(self, batch: Any, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        steps = torch.tensor(self._steps, device=terms["nll"].device)
        return {**self._parts, "nll_per_step": terms["nll"].detach() / steps}

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
        train = set(dm.train_smiles) if dm is not None and hasattr(dm, "train_smiles") else set()
        m = generation_metrics(smiles, train)
        for k in ("validity", "uniqueness", "novelty"):
            self.log(f"samples/{k}", m[k], rank_zero_only=True)
        path = draw_grid(smiles[:32], self.output_dir / "media" / f"molecules_epoch{self.current_epoch:03d}.png")
        if path is not None:
            log_image(self.trainer, "samples/molecules", path)
        log_table(self.trainer, "samples/smiles", ["smiles"], [[s] for s in smiles if s])
