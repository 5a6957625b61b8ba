"""PointFlow: a shape latent with a CNF prior, and a point CNF conditioned on it (Yang et al. 2019).

A shape ``X`` (N points in R^3) is encoded by a PointNet into a Gaussian posterior ``q(z|X)``. The ELBO is

    log p(X) >= E_q[ sum_i log p(x_i | z) ] + E_q[ log p(z) ] + H[q(z|X)]

with ``log p(x_i|z)`` from the point CNF (points <-> N(0, I), conditioned on ``z``) and ``log p(z)`` from the latent
CNF (``z`` <-> N(0, I)). Both CNFs are :class:`core.flows.CNF` with ConcatSquash dynamics from ``core.nn``.

Differences from the reference implementation (stevenygd/PointFlow): no moving batch-norm layers between CNF
blocks (one block each by default, where they act only at the ends), and the CNF trace noise is configurable
(Gaussian by default, as the reference).

References:
    Yang et al., PointFlow: 3D point cloud generation with continuous normalizing flows (2019), arXiv:1906.12320.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.distributions import FlowModel, StandardNormal
from core.flows import CNF
from core.presets import cnf_stack

__all__ = ["PointNetEncoder", "PointFlowModel"]


class PointNetEncoder(nn.Module):
    """Permutation-invariant encoder: shared per-point MLP (1x1 convs + BN), max-pool, then two MLP heads giving the
    posterior mean and log-variance of the shape latent. (B, N, 3) -> (B, zdim), (B, zdim)."""

    def __init__(self, zdim: int = 128, input_dim: int = 3, deterministic: bool = False) -> None:
        super().__init__()
        self.deterministic = deterministic
        chans = [input_dim, 128, 128, 256, 512]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv1d(a, b, 1), nn.BatchNorm1d(b)]
            if i < len(chans) - 2:
                layers.append(nn.ReLU())
        self.point_mlp = nn.Sequential(*layers)

        def head() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
                nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(),
                nn.Linear(128, zdim),
            )  # fmt: skip

        self.mean_head = head()
        self.logvar_head = None if deterministic else head()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.point_mlp(x.transpose(1, 2))  # (B, 512, N)
        h = h.max(dim=2).values  # (B, 512): invariant to the order of the points
        mean = self.mean_head(h)
        logvar = torch.zeros_like(mean) if self.logvar_head is None else self.logvar_head(h)
        return mean, logvar


class PointFlowModel(nn.Module):
    """Encoder + latent CNF prior (``latent``, a :class:`FlowModel`) + point CNF (``point_flow``).

    Arguments:
        zdim: shape-latent size (128 in the paper).
        point_hidden, latent_hidden: ConcatSquash widths of the point CNF (512-512-512) and latent CNF (256-256).
        point_blocks, latent_blocks: CNFs stacked in each (1 and 1).
        act: dynamics non-linearity (tanh).
        solver, atol, rtol, adjoint, end_time, train_end_time: CNF integration (dopri5, 1e-5, 1e-5, adjoint,
            T = 0.5 learned).
        trace, noise: training trace estimator (Hutchinson, Gaussian noise); ``set_trace("exact")`` for evaluation.
        use_latent_flow: False gives the auto-encoder mode (no prior, no sampling of new shapes).
        deterministic_encoder: a point estimate of ``z`` (no entropy term).
    """

    def __init__(
        self,
        zdim: int = 128,
        input_dim: int = 3,
        point_hidden: Sequence[int] = (512, 512, 512),
        latent_hidden: Sequence[int] = (256, 256),
        point_blocks: int = 1,
        latent_blocks: int = 1,
        act: str = "tanh",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        adjoint: bool = True,
        end_time: float = 0.5,
        train_end_time: bool = True,
        trace: str = "hutchinson",
        noise: str = "gaussian",
        use_latent_flow: bool = True,
        deterministic_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.zdim, self.input_dim = zdim, input_dim
        cnf = dict(
            solver=solver, atol=atol, rtol=rtol, adjoint=adjoint, end_time=end_time,
            train_end_time=train_end_time, trace=trace, noise=noise,
        )  # fmt: skip
        self.encoder = PointNetEncoder(zdim, input_dim, deterministic_encoder)
        self.point_flow = cnf_stack(input_dim, point_hidden, zdim, point_blocks, act, **cnf)
        self.point_base = StandardNormal(input_dim)  # one N(0, I) per point
        self.latent = (
            FlowModel(cnf_stack(zdim, latent_hidden, 0, latent_blocks, act, **cnf), StandardNormal(zdim))
            if use_latent_flow
            else None
        )

    # ---- densities ------------------------------------------------------------------------------------------
    def point_log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(X | z) summed over the points of each shape: x (B, N, 3), z (B, zdim) -> (B,)."""
        y, logdet = self.point_flow(x, z)
        b, n, d = y.shape
        return self.point_base.log_prob(y.reshape(b * n, d)).reshape(b, n).sum(1) + logdet

    def elbo_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-shape (B,) terms: ``recon`` = -log p(X|z), ``prior`` = -log p(z), ``entropy`` = H[q(z|X)]."""
        mean, logvar = self.encoder(x)
        if self.encoder.deterministic:
            z, entropy = mean, torch.zeros_like(mean[:, 0])
        else:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            entropy = 0.5 * logvar.sum(1) + 0.5 * self.zdim * (1.0 + math.log(2 * math.pi))
        prior = -self.latent.log_prob(z) if self.latent is not None else torch.zeros_like(entropy)
        return {"recon": -self.point_log_prob(x, z), "prior": prior, "entropy": entropy}

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The ELBO per shape (a lower bound on log p(X)), so that generic tools can treat this as a density."""
        t = self.elbo_terms(x)
        return -(t["recon"] + t["prior"]) + t["entropy"]

    # ---- generation -----------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean of the shape latent (B, zdim)."""
        return self.encoder(x)[0]

    def decode(self, z: Tensor, num_points: int, temperature: float = 1.0) -> Tensor:
        """Sample ``num_points`` points for each shape latent: (B, zdim) -> (B, num_points, 3)."""
        y = temperature * torch.randn(z.shape[0], num_points, self.input_dim, device=z.device, dtype=z.dtype)
        return self.point_flow.inverse(y, z)[0]

    def sample(
        self, n: int, num_points: int = 2048, temperature: float = 1.0, latent_temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """``n`` new shapes: latents from the prior CNF, then points. Returns (z (n, zdim), x (n, num_points, 3))."""
        if self.latent is None:
            raise RuntimeError(
                "this PointFlow was trained as an auto-encoder (use_latent_flow=false): it cannot sample"
            )
        z = self.latent.sample(n, temperature=latent_temperature)
        return z, self.decode(z, num_points, temperature)

    def reconstruct(self, x: Tensor, num_points: int | None = None, temperature: float = 1.0) -> Tensor:
        """Auto-encode: posterior mean of ``z``, then ``num_points`` (default: as many as given) new points."""
        return self.decode(self.encode(x), num_points or x.shape[1], temperature)

    def set_trace(self, trace: str) -> None:
        """Switch every CNF to ``"exact"`` (evaluation) or ``"hutchinson"`` (training) trace."""
        for m in self.modules():
            if isinstance(m, CNF):
                m.trace = trace
