"""The Laplace marginal of a model with several grouping factors: every
unit's latents integrated out at once, by sparse Newton and a sparse
log-determinant (docs/design.md §11).

::

    log p̃(θ, z) = log p(θ, x̂(θ), z) + (n / 2) log 2π − ½ log det(−H(θ, x̂(θ)))

with ``x̂(θ)`` the joint conditional mode of all units' latents and H their
sparse Hessian (:mod:`curvi.sparse_hessian`), factorised by CHOLMOD
(:mod:`curvi.sparse_cholesky`). Its gradient is exact, as on the one-plate
path: one differentiable Newton step at the mode gives ``∂x̂/∂θ``, and the
log-determinant's derivative runs through the sparse inverse subset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .factors import FactorView
from .modes import NoLaplaceApproximation
from .sparse_cholesky import sparse_logdet, sparse_solve
from .sparse_hessian import HessianPattern, hessian_pattern, sparse_hessian

__all__ = ["JointModes", "solve_joint_modes", "sparse_log_marginal"]


class JointModes(NamedTuple):
    """The joint conditional mode of all units' latents (detached).

    :ivar y: the mode ``x̂``, ``(n,)``.
    :ivar precision: ``−∂²log p/∂x²`` at ``y``: lower-triangle values on
        ``pattern.lower``.
    :ivar pattern: the Hessian's :class:`~curvi.sparse_hessian.HessianPattern`.
    :ivar converged: a one-element bool tensor: whether the Newton step fell below ``xtol``.
    :ivar step: the Newton step still to take at ``y``.
    :ivar num_iterations: Newton iterations taken.
    """

    y: torch.Tensor
    precision: torch.Tensor
    pattern: HessianPattern
    converged: torch.Tensor
    step: torch.Tensor
    num_iterations: int


def _pattern_of(view: FactorView, theta, x) -> HessianPattern:
    """The view's Hessian pattern, read once per view (and shared by its
    copies on other arguments of the same shapes)."""
    cached = view.__dict__.get("_hessian_pattern")
    if cached is None:
        cached = hessian_pattern(view, theta, x)
        view._hessian_pattern = cached
    return cached


def solve_joint_modes(
    view: FactorView,
    theta: torch.Tensor,
    x_init: torch.Tensor,
    *,
    xtol: float | None = None,
    max_iter: int = 50,
    max_step: float = 10.0,
) -> JointModes:
    """The joint conditional mode of the units' latents by sparse Newton
    with a backtracking line search on log p (a Levenberg shift where the
    Hessian is not negative definite, far from the mode).

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import FactorView

        def model(subject, item, obs):
            with pyro.plate("subjects", 4):
                a = pyro.sample("a", dist.Normal(0.0, 1.0))
            with pyro.plate("items", 3):
                b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", len(obs)):
                pyro.sample("z", dist.Poisson((a[subject] + b[item]).exp()), obs=obs)

        subject, item = torch.arange(12) % 4, torch.arange(12) // 4
        view = FactorView(model, subject, item, torch.arange(12.0), unit_plate=("subjects", "items"))
        modes = solve_joint_modes(view, view.init_theta, view.init_y)
        bool(modes.converged)   # True
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    theta, x = theta.detach(), x_init.detach().clone()
    if xtol is None:
        xtol = torch.finfo(x.dtype).eps ** 0.5
    pattern = _pattern_of(view, theta, x)
    diagonal = torch.as_tensor(pattern.lower.rows == pattern.lower.cols, device=x.device)
    value = None
    for iteration in range(max_iter + 1):
        value, g, H = sparse_hessian(view, theta, x, pattern)
        step = _newton_step(pattern, -H, g, diagonal)
        converged = bool(step.abs().max() <= xtol) if step.numel() else True
        if converged or iteration == max_iter:
            break
        size = step.abs().max()
        if size > max_step:
            step = step * (max_step / size)
        x = _line_search(view, theta, x, step, g, value)
    return JointModes(x, -H, pattern, torch.tensor([converged]), step, iteration)


def _newton_step(pattern, A, g, diagonal):
    """``A⁻¹ g`` for the precision A; where A is not positive definite,
    ``(A + λI)⁻¹ g`` with the smallest λ = 10^j · max|A_ii| that factors."""
    try:
        return sparse_solve(pattern.lower, A, g)
    except NoLaplaceApproximation:
        pass
    scale = float(A[diagonal].abs().max().clamp_min(1.0))
    for power in range(-8, 4):
        shift = scale * 10.0**power
        try:
            return sparse_solve(pattern.lower, A + shift * diagonal, g)
        except NoLaplaceApproximation:
            continue
    return g / scale  # a gradient step


def _line_search(view, theta, x, step, g, value, shrink=0.5, max_halvings=30):
    slope = (g * step).sum()
    alpha = 1.0
    for _ in range(max_halvings):
        trial = x + alpha * step
        with torch.no_grad():
            f = view.log_joint(theta, trial)
        if torch.isfinite(f) and f >= value + 1e-4 * alpha * slope:
            return trial
        alpha *= shrink
    return x + alpha * step


def sparse_log_marginal(
    view: FactorView,
    theta: torch.Tensor,
    x_start: torch.Tensor,
    *,
    xtol: float | None = None,
    max_iter: int = 50,
    create_graph: bool | None = None,
) -> tuple[torch.Tensor, JointModes]:
    """The Laplace approximation of ``log p(θ, z)`` with every unit of every
    grouping factor integrated out (module docstring); differentiable in
    ``theta`` (and in ``pyro.param`` leaves the model reads, with
    ``create_graph=True``). What :func:`~curvi.marginal.laplace_log_marginal`
    runs for a :class:`~curvi.factors.FactorView`.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import FactorView

        def model(subject, item, obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("subjects", 4):
                a = pyro.sample("a", dist.Normal(0.0, 1.0))
            with pyro.plate("items", 3):
                b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", len(obs)):
                pyro.sample("z", dist.Poisson((mu + a[subject] + b[item]).exp()), obs=obs)

        subject, item = torch.arange(12) % 4, torch.arange(12) // 4
        view = FactorView(model, subject, item, torch.arange(12.0), unit_plate=("subjects", "items"))
        theta = torch.zeros(1, requires_grad=True)
        value, modes = sparse_log_marginal(view, theta, view.init_y)
        value.backward()   # theta.grad: d log p̃(mu, z) / d mu

    :raises NoLaplaceApproximation: when the Hessian is not negative
        definite at the joint mode.
    """
    create_graph = theta.requires_grad if create_graph is None else create_graph
    modes = solve_joint_modes(view, theta, x_start, xtol=xtol, max_iter=max_iter)
    pattern = modes.pattern
    x = modes.y + modes.step  # the step still to take: its error is squared
    if create_graph:  # one differentiable Newton step: ∂x̂/∂θ = A⁻¹ ∂g/∂θ
        with torch.enable_grad():
            xx = modes.y.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(view.log_joint(theta, xx), xx, create_graph=True)
        x = modes.y + sparse_solve(pattern.lower, modes.precision, g)
    log_prob, _, H = sparse_hessian(view, theta, x, pattern, create_graph=create_graph)
    log_det = sparse_logdet(pattern.lower, -H)
    const = 0.5 * view.latent_dim * math.log(2 * math.pi)
    return log_prob + const - 0.5 * log_det, modes
