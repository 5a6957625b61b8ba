"""The density2d FlowModule: plain maximum likelihood plus a density picture after validation."""

from __future__ import annotations

from apps.density2d.plots import plot_density
from core.training import FlowModule
from core.training.media import log_image


class Density2DModule(FlowModule):
    """Writes ``media/density_epochNNN.png`` (data | model density | samples) and logs it to W&B."""

    def log_samples(self) -> None:
        data = self.trainer.datamodule.splits["val"].numpy()
        path = self.output_dir / "media" / f"density_epoch{self.current_epoch:03d}.png"
        plot_density(self.eval_model, data, path, title=f"epoch {self.current_epoch}", n_samples=2000)
        log_image(self.trainer, "samples/density", path)
