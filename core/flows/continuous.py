"""Continuous normalizing flows (FFJORD) on torchdiffeq.

The state ``x(t)`` follows ``dx/dt = f(t, x, context)``; along it ``d log|det dx(t)/dx(0)| / dt = tr(df/dx)``.
``CNF.forward`` integrates data -> latent over ``[0, T]`` and returns ``log|det dz/dx| = int_0^T tr(df/dx) dt``;
``inverse`` integrates back over ``[T, 0]``.

The dynamics is any module ``f(t, x, context) -> dx/dt`` with output shaped like ``x``. A dynamics that sets
``pointwise = True`` promises that along every dimension but the batch and the last one (points of a cloud) the
map acts element by element, so the exact trace needs only ``x.shape[-1]`` backward passes.

References:
    Chen et al., Neural ODEs (2018), arXiv:1806.07366. Grathwohl et al., FFJORD (2018), arXiv:1810.01367.
    Finlay et al., How to train your neural ODE (2020), arXiv:2002.02798 (kinetic / Jacobian regularisers).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from core.flows.base import Flow, sum_except_batch

__all__ = ["CNF", "no_logdet", "regularization_loss", "hutchinson_noise", "divergence_exact", "divergence_hutchinson"]

_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's step-size-controlled solvers
_MAX_PENDING = 64  # uncollected forward-solve records a CNF keeps before dropping the oldest
_SKIP = threading.local()  # set by no_logdet()


@contextmanager
def no_logdet() -> Iterator[None]:
    """Inside this block a CNF integrates its state only, no trace: for a caller that discards the log-det (drawing
    samples), this saves the trace's backward pass in every function evaluation and leaves the log-det out of the
    solver's error control. The log-det it returns is NaN, so that a sum that uses it by mistake shows."""
    before = getattr(_SKIP, "on", False)
    _SKIP.on = True
    try:
        yield
    finally:
        _SKIP.on = before


def hutchinson_noise(like: Tensor, kind: str) -> Tensor:
    """Noise with E[e e^T] = I for the Hutchinson estimator: ``rademacher`` (+-1) or ``gaussian``."""
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"unknown Hutchinson noise {kind!r}; choose rademacher or gaussian")


def _grad(out: Tensor, x: Tensor, weight: Tensor | None, create_graph: bool) -> Tensor:
    """d(weight . out)/dx, zeros where ``out`` does not depend on ``x`` (e.g. a constant velocity field)."""
    g = torch.autograd.grad(out, x, weight, create_graph=create_graph, retain_graph=True, allow_unused=True)[0]
    return torch.zeros_like(x) if g is None else g


def divergence_exact(
    dx: Tensor, x: Tensor, create_graph: bool, pointwise: bool = False, per_point: bool = False
) -> Tensor:
    """tr(d dx / d x) per sample, one backward pass per feature (per last-dim feature if ``pointwise``); with
    ``per_point`` (pointwise only) the trace of each point's block, shape ``x.shape[:-1]``."""
    if pointwise:
        div = x.new_zeros(x.shape[:-1])
        for i in range(x.shape[-1]):
            g = _grad(dx[..., i].sum(), x, None, create_graph)
            div = div + g[..., i]
        return div if per_point or div.dim() == 1 else sum_except_batch(div)
    flat = dx.reshape(dx.shape[0], -1)
    div = x.new_zeros(x.shape[0])
    for i in range(flat.shape[1]):
        g = _grad(flat[:, i].sum(), x, None, create_graph)
        div = div + g.reshape(x.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(
    dx: Tensor, x: Tensor, noise: Tensor, create_graph: bool, per_point: bool = False
) -> tuple[Tensor, Tensor]:
    """Unbiased estimate ``e^T (d dx/d x) e`` per sample (per point, summing the last dimension only, with
    ``per_point``); also returns the vector-Jacobian product ``e^T J``."""
    e_jac = _grad(dx, x, noise, create_graph)
    return ((e_jac * noise).sum(-1) if per_point else sum_except_batch(e_jac * noise)), e_jac


class _ODEFunc(nn.Module):
    """The augmented ODE of a CNF: state (x, logdet, [kinetic, jacobian], noise, context), or (x, context) alone
    under :func:`no_logdet`.

    The Hutchinson noise and the context ride in the state with zero derivative, so the adjoint pass
    re-evaluates the dynamics with exactly the noise and context of its own solve (and gives the context a
    gradient); an empty tensor stands for "none". Whether the regularisers are integrated is read from the
    state itself (6 entries with them, 4 without), not from module state: a later solve (an inverse, a sample)
    cannot change what the adjoint pass of an earlier solve integrates.
    """

    def __init__(self, dynamics: nn.Module, trace: str) -> None:
        super().__init__()
        self.dynamics = dynamics
        self.trace = trace
        self.num_evals = 0
        self.accepted: list[float] = []  # |dt| of the steps the recorded solve accepted
        self.accepted_adjoint: list[float] = []  # the same for adjoint solves (they run inside backward)

    # attached as torchdiffeq's callback_accept_step(_adjoint) while a solve is recorded (CNF._recording): an adaptive
    # solver calls them after each accepted step (a fixed-grid one would warn that it cannot)
    def _accept(self, t0: Tensor, y0: tuple[Tensor, ...], dt: Tensor) -> None:
        self.accepted.append(abs(float(dt.detach())))

    def _accept_adjoint(self, t0: Tensor, y0: tuple[Tensor, ...], dt: Tensor) -> None:
        self.accepted_adjoint.append(abs(float(dt.detach())))

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.num_evals += 1
        if len(state) == 2:  # no log-det (no_logdet): the dynamics alone, without a graph unless one is wanted
            context = state[1] if state[1].numel() else None
            return self.dynamics(t, state[0], context), torch.zeros_like(state[1])
        regularize = len(state) == 6
        x, noise, context = state[0], state[-2], state[-1]
        context = context if context.numel() else None
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (create_graph and x.requires_grad):
                # no graph is wanted upstream of x (evaluation, or the adjoint's no-grad passes): start one here
                x = x.detach().requires_grad_(True)
            dx = self.dynamics(t, x, context)
            e_jac = None
            pointwise = getattr(self.dynamics, "pointwise", False)
            per_point = pointwise and state[1].dim() > 1  # the log-det state holds one entry per point
            if self.trace == "hutchinson":
                div, e_jac = divergence_hutchinson(dx, x, noise, create_graph or regularize, per_point)
            else:
                div = divergence_exact(dx, x, create_graph, pointwise, per_point)
            out = [dx, div]
            if regularize:
                if e_jac is None:
                    _, e_jac = divergence_hutchinson(dx, x, noise, True)
                out += [sum_except_batch(dx * dx), sum_except_batch(e_jac * e_jac)]
        if not create_graph:
            out = [o.detach() for o in out]
        return (*out, torch.zeros_like(state[-2]), torch.zeros_like(state[-1]))


class CNF(Flow):
    """A continuous normalizing flow with learnable end time ``T`` (``T = sqrt_end_time ** 2``, as FFJORD).

    Arguments:
        dynamics: module ``f(t, x, context) -> dx/dt``.
        trace: ``"exact"`` (one backward pass per feature; small dimensions, evaluation) or ``"hutchinson"``.
        noise: ``"rademacher"`` or ``"gaussian"``; one draw per solve, fixed during it.
        solver, atol, rtol, step_size: passed to torchdiffeq (``step_size`` for fixed-grid solvers).
        adjoint: integrate the backward pass with the adjoint method (memory O(1) in the solver steps).
        end_time, train_end_time: initial ``T`` and whether it is learned.
        kinetic_energy, jacobian_norm: weights of the regularisers ``int |f|^2 dt`` and
            ``int |e^T df/dx|^2 dt``, integrated in the ODE state of each training-mode ``forward`` solve
            (never by ``inverse``). Each such solve records its integrals; :func:`regularization_loss` collects
            (and clears) the records, so a sample drawn between the forward pass and the loss changes nothing.
            ``regularization`` holds the integrals of the latest forward solve (empty when it had none).
        adjoint_seminorm: control the adjoint solve's step size by the state only, not the parameter
            gradients (Kidger et al. 2021, "Hey, that's not an ODE"): fewer backward steps, same gradients
            up to the tolerance.
        warm_start: in training mode, an adaptive solve starts with the largest step that the previous training
            solve of its kind (forward, inverse, adjoint) accepted, capped at the interval, instead of
            torchdiffeq's initial-step heuristic, which starts small and grows the step at most tenfold per step.
            The error control (``atol``, ``rtol``) is the same, so a step that is too large is rejected and shrunk
            as any other; what is saved is the ramp-up (and the heuristic's own evaluation) that every solve of a
            training run repeats. In evaluation mode every solve uses the heuristic, so that an evaluation does
            not depend on what ran before it (same numbers from a fresh process and after training).
    """

    def __init__(
        self,
        dynamics: nn.Module,
        trace: str = "hutchinson",
        noise: str = "rademacher",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        step_size: float | None = None,
        adjoint: bool = True,
        end_time: float = 1.0,
        train_end_time: bool = True,
        kinetic_energy: float = 0.0,
        jacobian_norm: float = 0.0,
        adjoint_seminorm: bool = True,
        warm_start: bool = True,
    ) -> None:
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
        hutchinson_noise(torch.zeros(1), noise)  # validate the name now
        self.func = _ODEFunc(dynamics, trace)
        self.noise_kind = noise
        self.solver, self.atol, self.rtol, self.step_size, self.adjoint = solver, atol, rtol, step_size, adjoint
        self.adjoint_seminorm = adjoint_seminorm
        self.warm_start = warm_start
        self.first_steps: dict[str, float] = {}  # kind -> the largest step its latest solve accepted
        sqrt_t = torch.tensor(math.sqrt(end_time))
        if train_end_time:
            self.sqrt_end_time = nn.Parameter(sqrt_t)
        else:
            self.register_buffer("sqrt_end_time", sqrt_t)
        self.kinetic_energy, self.jacobian_norm = kinetic_energy, jacobian_norm
        self.regularization: dict[str, Tensor] = {}  # the latest forward solve's integrals, for inspection
        self._pending: list[dict[str, Tensor]] = []  # forward solves' integrals not yet collected
        self._warned = False

    @property
    def trace(self) -> str:
        return self.func.trace

    @trace.setter
    def trace(self, value: str) -> None:
        if value not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {value!r}")
        self.func.trace = value

    @property
    def end_time(self) -> Tensor:
        return self.sqrt_end_time**2

    def _solve(self, x: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("CNF needs autograd for its trace: use torch.no_grad(), not torch.inference_mode()")
        regularize = self.training and (self.kinetic_energy > 0 or self.jacobian_norm > 0) and not reverse
        if getattr(_SKIP, "on", False) and not regularize:
            return self._solve_state_only(x, context, reverse)
        needs_noise = self.func.trace == "hutchinson" or regularize
        noise = hutchinson_noise(x, self.noise_kind) if needs_noise else x.new_zeros(0)
        zero = x.new_zeros(x.shape[0])
        # a pointwise dynamics integrates one log-det per point (as PointFlow's reference): the solver's error
        # control then weighs each point's log-det like one coordinate, instead of tightening with the point count
        logdet0 = x.new_zeros(x.shape[:-1]) if getattr(self.func.dynamics, "pointwise", False) else zero
        ctx = context if context is not None else x.new_zeros(0)
        state = (x, logdet0, zero, zero, noise, ctx) if regularize else (x, logdet0, noise, ctx)
        times = self._times(x, reverse)
        kind = "inverse" if reverse else "forward"
        kwargs = self._solver_kwargs(kind)
        if self.adjoint and torch.is_grad_enabled():
            adjoint_options = self._solver_kwargs("adjoint").get("options", {})
            if self.adjoint_seminorm and not self.step_size:
                adjoint_options["norm"] = "seminorm"
            extra = dict(adjoint_options=adjoint_options) if adjoint_options else {}
            with self._recording(kind):
                out = odeint_adjoint(
                    self.func, state, times, adjoint_params=tuple(self.func.parameters()), **kwargs, **extra
                )
        else:
            with self._recording(kind):
                out = odeint(self.func, state, times, **kwargs)
        final = [o[-1] for o in out]
        if not reverse:
            self.regularization = {"kinetic_energy": final[2], "jacobian_norm": final[3]} if regularize else {}
            if regularize:
                self._record(self.regularization)
        logdet = final[1] if final[1].dim() == 1 else sum_except_batch(final[1])
        return final[0], logdet

    def _solver_kwargs(self, kind: str | None = None) -> dict:
        """torchdiffeq's arguments; with ``kind`` and :attr:`warm_start`, the first step of an adaptive solve."""
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.solver)
        if self.step_size is not None:
            kwargs["options"] = dict(step_size=self.step_size)
        elif kind is not None and self._warm():
            if kind == "adjoint" and self.func.accepted_adjoint:  # the adjoint solve of the previous backward
                self.first_steps["adjoint"] = max(self.func.accepted_adjoint)
                self.func.accepted_adjoint = []
            first = self.first_steps.get(kind)
            if first is not None:
                span = float(self.end_time.detach().abs())
                kwargs["options"] = dict(first_step=min(first, span) if span > 0 else first)
        return kwargs

    def _warm(self) -> bool:
        return self.warm_start and self.training and self.step_size is None and self.solver in _ADAPTIVE

    @contextmanager
    def _recording(self, kind: str) -> Iterator[None]:
        """Record the steps the solve inside this block accepts; afterwards the largest is ``first_steps[kind]``."""
        if not self._warm():
            yield
            return
        func = self.func
        outer, func.accepted = func.accepted, []
        # torchdiffeq copies the callbacks when the solve starts (the adjoint one too, for the later backward)
        func.callback_accept_step, func.callback_accept_step_adjoint = func._accept, func._accept_adjoint
        try:
            yield
            if func.accepted:
                self.first_steps[kind] = max(func.accepted)
        finally:
            func.accepted = outer
            del func.callback_accept_step, func.callback_accept_step_adjoint

    def _times(self, like: Tensor, reverse: bool) -> Tensor:
        t_end = self.end_time.to(like)
        return torch.stack([t_end, t_end.new_zeros(())]) if reverse else torch.stack([t_end.new_zeros(()), t_end])

    def _solve_state_only(self, x: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        """x alone through the ODE (see :func:`no_logdet`); the log-det returned is NaN."""
        state = (x, context if context is not None else x.new_zeros(0))
        kind = "inverse, state only" if reverse else "forward, state only"
        kwargs, times = self._solver_kwargs(kind), self._times(x, reverse)
        with self._recording(kind):
            if self.adjoint and torch.is_grad_enabled():
                out = odeint_adjoint(self.func, state, times, adjoint_params=tuple(self.func.parameters()), **kwargs)
            else:
                out = odeint(self.func, state, times, **kwargs)
        return out[0][-1], x.new_full((x.shape[0],), math.nan)

    def _record(self, integrals: dict[str, Tensor]) -> None:
        if len(self._pending) >= _MAX_PENDING:
            # nobody collects (a training-mode loop without regularization_loss): keep memory bounded
            if not self._warned:
                warnings.warn(
                    f"CNF: {_MAX_PENDING} forward solves' regularisers were never collected; call "
                    "core.flows.regularization_loss(model) once per training step (the oldest are dropped)",
                    stacklevel=3,
                )
                self._warned = True
            self._pending.pop(0)
        self._pending.append(integrals)

    def collect_regularization(self) -> Tensor | None:
        """Weighted regulariser, averaged over the batch and summed over the forward solves since the last
        collection (None if there were none); clears the records."""
        pending, self._pending = self._pending, []
        total = None
        for r in pending:
            term = self.kinetic_energy * r["kinetic_energy"].mean() + self.jacobian_norm * r["jacobian_norm"].mean()
            total = term if total is None else total + term
        return total

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, reverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, reverse=True)


def regularization_loss(model: nn.Module) -> Tensor | None:
    """Weighted sum, averaged over the batch, of the regularisers the CNFs in ``model`` integrated in their
    training-mode forward solves since the last call (None if there were none). Inverse solves (sampling)
    record nothing. The records are cleared: call this once per training step, where the loss is built."""
    total = None
    for m in model.modules():
        if isinstance(m, CNF):
            term = m.collect_regularization()
            if term is not None:
                total = term if total is None else total + term
    return total
