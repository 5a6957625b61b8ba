"""The one interface every flow implements, and the generic combinators.

Conventions (see DESIGN.md):

* ``forward`` is the density direction, data -> latent; ``inverse`` is the sampling direction.
* Both return ``(output, logdet)`` with ``logdet = log|det d output / d input|`` of shape ``(batch,)``,
  summed over every non-batch dimension. A layer never reduces over the batch.
* Conditioning enters through ``context`` only.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

__all__ = ["Flow", "Sequential", "Inverse", "sum_except_batch"]


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


class Flow(nn.Module):
    """An invertible map with a tractable log-determinant.

    Subclasses implement both directions; each returns the transformed tensor and the per-sample
    log |det| of its own Jacobian, so that ``inverse`` returns minus the ``forward`` log-det at the
    corresponding point.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """data -> latent. Returns ``(z, logdet)`` with ``logdet = log|det dz/dx|``, shape (batch,)."""
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """latent -> data. Returns ``(x, logdet)`` with ``logdet = log|det dx/dz|``, shape (batch,)."""
        raise NotImplementedError


class Sequential(Flow):
    """Composition ``f_n o ... o f_1``: ``forward`` applies the flows in order, ``inverse`` in reverse."""

    def __init__(self, *flows: Flow | Iterable[Flow]) -> None:
        super().__init__()
        if len(flows) == 1 and not isinstance(flows[0], nn.Module):
            flows = tuple(flows[0])
        for i, f in enumerate(flows):
            if not isinstance(f, Flow):
                raise TypeError(f"Sequential: element {i} is {type(f).__name__}, expected a Flow")
        self.flows = nn.ModuleList(flows)

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, i: int) -> Flow:
        return self.flows[i]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for flow in self.flows:
            x, ld = flow(x, context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        for flow in reversed(self.flows):
            z, ld = flow.inverse(z, context)
            logdet = logdet + ld
        return z, logdet


class Inverse(Flow):
    """Swaps the two directions of a flow (for example an IAF-style use of an MAF layer)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(z, context)
