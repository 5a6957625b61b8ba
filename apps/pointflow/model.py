"""PointFlow: a shape latent with a CNF prior, and a point CNF conditioned on it (Yang et al. 2019).

A shape ``X`` (N points in R^3) is encoded by a PointNet into a Gaussian posterior ``q(z|X)``. The ELBO is

    log p(X) >= E_q[ sum_i log p(x_i | z) ] + E_q[ log p(z) ] + H[q(z|X)]

with ``log p(x_i|z)`` from the point CNF (points <-> N(0, I), conditioned on ``z``) and ``log p(z)`` from the latent
CNF (``z`` <-> N(0, I)). Both CNFs are :class:`core.flows.CNF` with ConcatSquash dynamics from ``core.nn``; as in
the reference's ``models/flow.py``, a :class:`MovingBatchNorm` stands before the first CNF and after every CNF
(``batch_norm=True``).

Difference from the reference implementation (stevenygd/PointFlow), kept on purpose: the moving batch-norm of
the point CNF takes its statistics per coordinate over all points of the batch. The reference's layer reshapes the
(B, N, 3) batch as ``x.transpose(0, 1).reshape(3, -1)``, which for point clouds pools all three coordinates of a
third of the points into each "channel" statistic (its latent CNF, on (B, zdim), is per feature as here).

References:
    Yang et al., PointFlow: 3D point cloud generation with continuous normalizing flows (2019), arXiv:1906.12320.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.distributions import FlowModel, StandardNormal
from core.flows import CNF, Flow, Sequential
from core.flows.affine import affine_forward, affine_inverse
from core.flows.continuous import no_logdet
from core.presets import cnf_stack

__all__ = ["MovingBatchNorm", "cnf_chain", "PointNetEncoder", "PointFlowModel"]


class MovingBatchNorm(Flow):
    """PointFlow's moving batch-norm (the reference's ``MovingBatchNorm1d`` with ``bn_lag=0``), as a flow.

    ``y = (x - m) / sqrt(v + eps) * exp(w) + b`` per feature (the last dimension), with learned ``w, b`` (zero at
    the start) and running statistics ``m, v`` (0 and 1 at the start). The map always uses the running
    statistics as they are *before* the current batch, in training as in evaluation, so it is an exact
    invertible affine map with ``log|det| = sum(w - log(v + eps) / 2)`` per element of the features; a training-mode
    ``forward`` then moves them towards the batch's mean and (unbiased) variance over all other dimensions:
    ``m <- m - decay (m - mean)``. ``inverse`` never updates them (sampling).

    (B, ..., F) -> (B, ..., F); log-det per sample (summed over all points).
    """

    def __init__(self, features: int, eps: float = 1e-4, decay: float = 0.1) -> None:
        super().__init__()
        self.features, self.eps, self.decay = features, eps, decay
        self.weight = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def _map(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Shift and log-scale (F,) of ``y = x * exp(log_scale) + shift`` from the current running statistics,
        and the per-sample log-det (B,)."""
        mean, var = self.running_mean.clone(), self.running_var.clone()  # the forward may update the buffers
        log_scale = self.weight - 0.5 * torch.log(var + self.eps)
        shift = self.bias - mean * log_scale.exp()
        per_sample = like[0].numel() // self.features  # points per sample
        return shift, log_scale, (log_scale.sum() * per_sample).expand(like.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.shape[-1] != self.features:
            raise ValueError(f"MovingBatchNorm: expected {self.features} features last, got shape {tuple(x.shape)}")
        shift, log_scale, logdet = self._map(x)
        y, _ = affine_forward(x, shift, log_scale)
        if self.training:
            with torch.no_grad():
                flat = x.detach().reshape(-1, self.features)
                self.running_mean.sub_(self.decay * (self.running_mean - flat.mean(0)))
                self.running_var.sub_(self.decay * (self.running_var - flat.var(0)))
        return y, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, log_scale, logdet = self._map(z)
        x, _ = affine_inverse(z, shift, log_scale)
        return x, -logdet


def cnf_chain(
    features: int,
    hidden: Sequence[int],
    context_features: int = 0,
    blocks: int = 1,
    act: str = "tanh",
    batch_norm: bool = True,
    **cnf_kwargs,
) -> Sequential:
    """The reference's ``build_model``: ``blocks`` CNFs with ConcatSquash dynamics, and with ``batch_norm`` a
    :class:`MovingBatchNorm` before the first and after every CNF (``BN, CNF, BN, CNF, BN ...``)."""
    cnfs = cnf_stack(features, hidden, context_features, blocks, act, **cnf_kwargs)
    if not batch_norm:
        return cnfs
    chain: list[Flow] = [MovingBatchNorm(features)]
    for cnf in cnfs:
        chain += [cnf, MovingBatchNorm(features)]
    return Sequential(chain)


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
        warm_start: a training solve starts from the previous one's step size (``core.flows.CNF``; same tolerances,
            fewer evaluations; evaluation and sampling solves are unaffected); False: torchdiffeq's initial step.
        trace, noise: training trace estimator (Hutchinson, Gaussian noise); ``set_trace("exact")`` for evaluation.
        batch_norm: moving batch-norm around each CNF (:func:`cnf_chain`), as the reference (on).
        use_latent_flow: False gives the auto-encoder mode (no prior, no sampling of new shapes).
        deterministic_encoder: a point estimate of ``z`` (no entropy term, no log-variance head).
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
        batch_norm: bool = True,
        use_latent_flow: bool = True,
        deterministic_encoder: bool = False,
        warm_start: bool = True,
    ) -> None:
        super().__init__()
        self.zdim, self.input_dim = zdim, input_dim
        cnf = dict(
            solver=solver, atol=atol, rtol=rtol, adjoint=adjoint, end_time=end_time,
            train_end_time=train_end_time, trace=trace, noise=noise, warm_start=warm_start,
        )  # fmt: skip
        self.encoder = PointNetEncoder(zdim, input_dim, deterministic_encoder)
        self.point_flow = cnf_chain(input_dim, point_hidden, zdim, point_blocks, act, batch_norm, **cnf)
        self.point_base = StandardNormal(input_dim)  # one N(0, I) per point
        self.latent = (
            FlowModel(cnf_chain(zdim, latent_hidden, 0, latent_blocks, act, batch_norm, **cnf), StandardNormal(zdim))
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
        """The shape latent (B, zdim) as the reference's ``encode``: the encoder's output for a deterministic encoder
        (auto-encoder mode), else a draw from the posterior ``q(z|X)``."""
        mean, logvar = self.encoder(x)
        if self.encoder.deterministic:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def decode(self, z: Tensor, points: int, temperature: float = 1.0) -> Tensor:
        """Sample ``points`` points for each shape latent: (B, zdim) -> (B, points, 3)."""
        y = temperature * torch.randn(z.shape[0], points, self.input_dim, device=z.device, dtype=z.dtype)
        with no_logdet():  # the points' log-density is not needed: no trace in the solve
            return self.point_flow.inverse(y, z)[0]

    def sample(
        self, n: int, points: int = 2048, temperature: float = 1.0, latent_temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """``n`` new shapes: latents from the prior CNF, then points. Returns (z (n, zdim), x (n, points, 3))."""
        if self.latent is None:
            raise RuntimeError(
                "this PointFlow was trained as an auto-encoder (use_latent_flow=false): it cannot sample"
            )
        with no_logdet():
            z = self.latent.sample(n, temperature=latent_temperature)
        return z, self.decode(z, points, temperature)

    def reconstruct(self, x: Tensor, points: int | None = None, temperature: float = 1.0) -> Tensor:
        """Auto-encode as the reference: ``z = encode(x)``, then ``points`` (default: as many as given) new points."""
        return self.decode(self.encode(x), points or x.shape[1], temperature)

    def set_trace(self, trace: str) -> None:
        """Switch every CNF to ``"exact"`` (evaluation) or ``"hutchinson"`` (training) trace."""
        for m in self.modules():
            if isinstance(m, CNF):
                m.trace = trace
