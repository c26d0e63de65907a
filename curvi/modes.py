"""Conditional modes of the unit latents, ŷ(θ) = argmax_y log p(θ, y, z).

Units are conditionally independent given θ, so the inner problem splits
into N small problems of dimension k solved together: batched Newton steps
with the unit blocks of the Hessian (k + 1 backward passes per iteration,
whatever N), a backtracking line search per unit (or on the total when the
model's terms cannot be split by unit), and a step cap.

:func:`implicit_modes` then takes one differentiable Newton step at the
solution, ``ŷ = ŷ* + Dᵢ⁻¹ ∇_y log p(θ, ŷ*)`` with the precision block ``Dᵢ``
detached (docs/design.md §4.3): its value is ``ŷ*`` refined by one more step, its
derivative with respect to θ is the implicit-function one, ``−Dᵢ⁻¹ Bᵢ``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import distributed
from .hessian import gradient, local_hessian
from .model import ModelView

_ARMIJO = 1e-4  # sufficient-increase constant of the line search
_MAX_HALVINGS = 30
_MAX_LISTED_UNITS = 10


class ModeConvergenceWarning(UserWarning):
    """Some units did not reach their conditional mode."""


class NoLaplaceApproximation(ValueError):
    """A unit's Hessian block is not negative definite at its conditional
    mode, so the Laplace approximation of its integral does not exist there.

    The one error the Laplace marginal's callers treat as "reject this θ"
    (an optimiser's trial point, a NUTS proposal): any other error -- a
    shape bug in the user's model, say -- propagates with its traceback.
    """


def mode_cholesky(precision: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
    """Cholesky factors ``L`` of the units' precision blocks at their modes,
    ``(n, k, k)`` (differentiable): what Laplace's method and adaptive
    quadrature scale the units' integrals by.

    Usage::

        mode_cholesky(torch.eye(2).expand(3, 2, 2))          # three identity factors
        try:
            mode_cholesky(-torch.eye(1).expand(2, 1, 1))
        except NoLaplaceApproximation as error:
            print(error)                                     # names units [0, 1]

    :raises NoLaplaceApproximation: naming the units (their indices in the
        plate when ``units`` is given) whose block is not positive definite.
    """
    L, info = torch.linalg.cholesky_ex(precision)
    if (info > 0).any():
        bad = (info > 0).nonzero().flatten()
        bad = bad if units is None else units[bad]
        raise NoLaplaceApproximation(
            f"the Hessian of {bad.numel()} units is not negative definite at their "
            f"conditional modes (units {bad[:10].tolist()}): no Laplace approximation there"
        )
    return L


class ModeResult(NamedTuple):
    """The outcome of :func:`solve_modes` (all tensors detached).

    :ivar y: the modes, ``(n, k)`` unconstrained.
    :ivar precision: ``−∂²log p/∂yᵢ²`` at ``y``, ``(n, k, k)``.
    :ivar converged: per unit, whether the Newton step fell below ``xtol``.
    :ivar step: the Newton step still to take at ``y`` (``(n, k)``); its size
        is the error of ``y`` to first order.
    :ivar num_iterations: Newton iterations taken.
    """

    y: torch.Tensor
    precision: torch.Tensor
    converged: torch.Tensor
    step: torch.Tensor
    num_iterations: int


def newton_inverse(precision: torch.Tensor) -> torch.Tensor:
    """Inverses of the unit precision blocks for a Newton step, ``(n, k, k)``.

    Positive-definite blocks are inverted through their Cholesky factor; an
    indefinite or singular block (a coordinate without curvature: a masked
    latent, say) is replaced by its absolute value (eigenvalues ``|λ|``,
    floored), which keeps the step an ascent direction.

    Usage::

        P = torch.stack([torch.eye(2), -torch.eye(2), torch.zeros(2, 2)])  # PD, indefinite, singular
        newton_inverse(P)  # [I, I, I / floor]
    """
    L, info = torch.linalg.cholesky_ex(precision)
    bad = info > 0
    if not bad.any():
        return torch.cholesky_inverse(L)
    # a failed factor is not a factor (a singular block's has a zero on its
    # diagonal, which cholesky_inverse rejects): invert only the good ones
    inverse = torch.empty_like(precision)
    good = ~bad
    if good.any():
        inverse[good] = torch.cholesky_inverse(L[good])
    if bad.any():
        lam, Q = torch.linalg.eigh(precision[bad])
        scale = lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
        floor = torch.finfo(lam.dtype).eps ** 0.5 * scale
        inverse[bad] = (Q / lam.abs().clamp_min(floor).unsqueeze(-2)) @ Q.mT
    return inverse


def solve_modes(
    view: ModelView,
    theta: torch.Tensor,
    y_init: torch.Tensor,
    *,
    units: torch.Tensor | None = None,
    xtol: float | None = None,
    max_iter: int = 50,
    max_step: float = 10.0,
) -> ModeResult:
    """Per-unit conditional modes of ``view.log_joint(theta, ·)`` by batched Newton.

    Runs without building a graph. A unit has converged when its Newton
    step is below ``xtol`` in every coordinate; :func:`implicit_modes` then
    takes one more step, so the modes it returns are accurate to about
    ``xtol²``.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(counts):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", len(counts)):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("c", dist.Poisson(u.exp()), obs=counts)

        view = ModelView(model, torch.tensor([0.0, 4.0, 30.0]), unit_plate="groups")
        result = solve_modes(view, view.init_theta, torch.zeros(3, 1))
        result.converged.all()  # tensor(True)

    :param ModelView view: the model.
    :param theta: global coordinates ``(p,)``, held fixed.
    :param y_init: starting point ``(n, k)`` (e.g. the previous solution).
    :param units: unit indices of the rows (see :meth:`ModelView.log_joint`).
    :param float xtol: step tolerance; default ``sqrt(eps)`` of the dtype.
    :param int max_iter: iteration cap.
    :param float max_step: cap on each unit's step (max norm, unconstrained).
    :raises NoLaplaceApproximation: (a ValueError) when the log density, its
        gradient or the unit blocks are not finite at the starting point
        (naming ``theta``, ``y`` or the sites responsible).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not max_step > 0:
        raise ValueError(f"max_step must be positive, got {max_step}")
    theta, y = theta.detach(), y_init.detach().clone()
    if xtol is None:
        xtol = torch.finfo(y.dtype).eps ** 0.5
    if y.numel() == 0:  # no unit latents (a view without a unit plate): nothing to solve
        empty = y.new_zeros(y.shape + y.shape[-1:])
        return ModeResult(y, empty, torch.ones(y.shape[0], dtype=torch.bool, device=y.device), y, 0)
    search = _unit_line_search if view.separable else _total_line_search
    value = None  # the log density at y, known after the first line search
    for iteration in range(max_iter + 1):
        log_prob, g, D = local_hessian(view, theta, y, units=units)
        if iteration == 0:
            _check_start(view, theta, y, units, log_prob, g, D)
        step = (newton_inverse(-D) @ g.unsqueeze(-1)).squeeze(-1)
        converged = step.abs().amax(-1) <= xtol
        if converged.all() or iteration == max_iter:
            break
        step = _capped(step.masked_fill(converged.unsqueeze(-1), 0.0), max_step)
        y, value = search(view, theta, y, step, g, units, value)
    return ModeResult(y, -D, converged, step, iteration)


def implicit_modes(
    view: ModelView,
    theta: torch.Tensor,
    result: ModeResult,
    *,
    units: torch.Tensor | None = None,
    create_graph: bool | None = None,
) -> torch.Tensor:
    """One differentiable Newton step at the solved modes.

    ``ŷ = ŷ* + Dᵢ⁻¹ ∇_y log p(θ, ŷ*)`` with ``Dᵢ`` detached: the value is the
    solution refined by one more step, and backward through it gives the
    implicit-function derivative ``∂ŷ/∂θ = −Dᵢ⁻¹ Bᵢ`` when ``theta`` carries
    autograd history (``create_graph``, default ``theta.requires_grad``; pass
    True to differentiate with respect to ``pyro.param`` leaves the model
    reads).

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 3):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("z", dist.Normal(u, 0.5), obs=torch.tensor([0.0, 1.0, 2.0]))

        view = ModelView(model, unit_plate="groups")
        theta = view.init_theta.clone().requires_grad_()
        y_hat = implicit_modes(view, theta, solve_modes(view, theta, view.init_y))
        y_hat.sum().backward()  # theta.grad = d(sum of modes)/d mu = 3 * 0.2
    """
    if result.y.numel() == 0:
        return result.y
    create_graph = theta.requires_grad if create_graph is None else create_graph
    _, g_y = gradient(view, theta, result.y, units=units, create_graph=create_graph)
    inverse = newton_inverse(result.precision)
    return result.y + (inverse @ g_y.unsqueeze(-1)).squeeze(-1)


def warn_unconverged(result: ModeResult, *, units: torch.Tensor | None = None, stacklevel: int = 2) -> None:
    """Warn, naming them, about the units whose Newton solve did not converge
    (for several grouping factors' joint solve, that it did not)."""
    if getattr(result, "pattern", None) is not None:  # a JointModes of several grouping factors
        if not bool(result.converged.all()):
            warnings.warn(
                f"the joint mode of the units' latents was not reached in {result.num_iterations} "
                f"Newton iterations (last step {float(result.step.abs().max()):.3g}); the Laplace "
                "approximation is taken at the last iterate",
                ModeConvergenceWarning,
                stacklevel=stacklevel + 1,
            )
        return
    bad = (~result.converged).nonzero().flatten()
    if bad.numel() == 0:
        return
    if units is not None:
        bad = units[bad]
    bad = bad + distributed.unit_offset()  # global indices when processes share the units
    shown = ", ".join(str(i) for i in bad[:_MAX_LISTED_UNITS].tolist())
    more = ", ..." if bad.numel() > _MAX_LISTED_UNITS else ""
    where = f" on rank {distributed.rank()}" if distributed.is_sharded() else ""
    warnings.warn(
        f"{bad.numel()} of {result.y.shape[0]} units{where} did not reach their conditional "
        f"mode in {result.num_iterations} Newton iterations (units {shown}{more}); "
        "their Gaussian approximation is centred at the last iterate",
        ModeConvergenceWarning,
        stacklevel=stacklevel + 1,
    )


# ------------------------------------------------------------------ steps
def _check_start(view, theta, y, units, log_prob, g, D):
    """Refuse a starting point where the log density, its gradient or the
    unit blocks are not finite (Newton would carry NaN into the modes),
    naming the coordinates or the sites responsible. A
    :class:`NoLaplaceApproximation`, so that the Laplace marginal's callers
    reject such a θ (an optimiser's trial point that overflows) as they
    reject one without a mode."""
    if torch.isfinite(log_prob) and torch.isfinite(g).all() and torch.isfinite(D).all():
        return
    try:
        view.check_finite(theta, y, units=units)
    except ValueError as error:  # names theta, y or the sites
        raise NoLaplaceApproximation(f"the mode solve cannot start: {error}") from None
    bad = (~torch.isfinite(g).all(-1) | ~torch.isfinite(D).flatten(-2).all(-1)).nonzero().flatten()
    bad = bad if units is None else units[bad]
    raise NoLaplaceApproximation(
        "the log density is finite at the starting point of the mode solve but its gradient "
        f"or curvature in the unit latents is not (units {bad[:_MAX_LISTED_UNITS].tolist()})"
    )


def _capped(step, max_step):
    size = step.abs().amax(-1, keepdim=True)
    return step * (max_step / size).clamp(max=1.0)


def _unit_line_search(view, theta, y, step, g, units, f0=None):
    """Backtracking per unit on its own log density (separable models).
    Returns the new point and its per-unit log densities."""
    if f0 is None:
        f0 = view.unit_log_joint(theta, y, units=units)
    slope = (g * step).sum(-1)
    alpha = torch.ones_like(y[:, 0])  # the coordinates' dtype, whatever the density's
    tolerance = 10 * torch.finfo(y.dtype).eps * f0.abs()
    for _ in range(_MAX_HALVINGS):
        f1 = view.unit_log_joint(theta, y + alpha.unsqueeze(-1) * step, units=units)
        ok = torch.isfinite(f1) & (f1 >= f0 + _ARMIJO * alpha * slope - tolerance)
        if ok.all():
            break
        alpha = torch.where(ok, alpha, alpha / 2)
    else:  # units that never improved stay where they were
        alpha = torch.where(ok, alpha, torch.zeros_like(alpha))
        f1 = torch.where(ok, f1, f0)
    return y + alpha.unsqueeze(-1) * step, f1


def _total_line_search(view, theta, y, step, g, units, f0=None):
    """Backtracking on the total log density (terms not split by unit).
    Returns the new point and its log density."""
    if f0 is None:
        f0 = view.log_joint(theta, y, units=units)
    slope = (g * step).sum()
    tolerance = 10 * torch.finfo(y.dtype).eps * f0.abs()
    alpha = 1.0
    for _ in range(_MAX_HALVINGS):
        f1 = view.log_joint(theta, y + alpha * step, units=units)
        if torch.isfinite(f1) and f1 >= f0 + _ARMIJO * alpha * slope - tolerance:
            return y + alpha * step, f1
        alpha /= 2
    return y, f0
