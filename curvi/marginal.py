"""Laplace-marginal inference: the unit latents integrated out by Laplace's method.

For a model with globals θ and unit latents y (DESIGN §4)::

    log p̃(θ, z) = log p(θ, ŷ(θ), z) + (N k / 2) log 2π − ½ Σᵢ log det(−Dᵢ(θ, ŷ(θ)))

with ŷ(θ) the units' conditional modes and Dᵢ their Hessian blocks, all in
unconstrained coordinates. It is what TMB, glmmTMB and Stan's embedded
Laplace compute. Its gradient is exact: the implicit derivative of ŷ
(:func:`~curvi.modes.implicit_modes`) and the derivative of the unit blocks
(third derivatives of log p, from a differentiable :func:`local_hessian`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .hessian import local_hessian
from .modes import ModeResult, implicit_modes, solve_modes, warn_unconverged


def laplace_log_marginal(view, theta, y_start, *, units=None, xtol=None, max_iter=50):
    """The Laplace approximation of ``log p(θ, z)`` with the units integrated out.

    Differentiable with respect to ``theta`` when it requires grad.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):  # Gaussian: the Laplace approximation is exact
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", len(obs)):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

        view = ModelView(model, torch.tensor([0.3, 1.2]), unit_plate="groups")
        theta = torch.zeros(1, requires_grad=True)
        value, modes = laplace_log_marginal(view, theta, view.init_y)
        value.backward()  # theta.grad: d log p(mu, z) / d mu

    :param ModelView view: the model.
    :param theta: global coordinates ``(p,)``.
    :param y_start: where the Newton solve for the modes starts, ``(n, k)``.
    :param units: unit indices of the rows (under a subsampled plate the unit
        terms are scaled by ``N / n``, an unbiased estimate).
    :returns: ``(value, modes)``, the scalar log marginal and the
        :class:`~curvi.modes.ModeResult`.
    :raises ValueError: when a unit's Hessian block is not negative definite
        at its mode (the Laplace approximation does not exist there).
    """
    result = solve_modes(view, theta, y_start, units=units, xtol=xtol, max_iter=max_iter)
    y = implicit_modes(view, theta, result, units=units)
    log_prob, _, D = local_hessian(view, theta, y, units=units, create_graph=theta.requires_grad)
    scale = view.num_units / y.shape[0]
    L, info = torch.linalg.cholesky_ex(-D / scale)  # one unit's own precision block
    if (info > 0).any():
        bad = (info > 0).nonzero().flatten()
        bad = bad if units is None else units[bad]
        raise ValueError(
            f"the Hessian of {bad.numel()} units is not negative definite at their "
            f"conditional modes (units {bad[:10].tolist()}): no Laplace approximation there"
        )
    log_det = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum()
    const = 0.5 * view.num_units * view.local_dim * math.log(2 * math.pi)
    return log_prob + const - 0.5 * scale * log_det, result


class LaplaceMode(NamedTuple):
    """The result of :func:`laplace_mode`.

    :ivar theta: the maximiser of the Laplace log marginal, ``(p,)``.
    :ivar log_marginal: its value.
    :ivar modes: the units' conditional modes there (a ModeResult).
    :ivar grad_norm: max-norm of the gradient at ``theta``.
    :ivar num_evaluations: function and gradient evaluations used.
    :ivar converged: whether ``grad_norm`` fell below the tolerance.
    """

    theta: torch.Tensor
    log_marginal: torch.Tensor
    modes: ModeResult
    grad_norm: float
    num_evaluations: int
    converged: bool


def laplace_mode(view, theta0, *, y_start=None, gtol=None, max_eval=200) -> LaplaceMode:
    """Maximise the Laplace log marginal over θ by L-BFGS with exact gradients.

    The units' modes are warm-started from the previous evaluation. This is
    the posterior mode of θ under the Laplace approximation (with the
    model's priors on θ); with flat priors it is the glmmTMB / lme4
    maximum-likelihood estimate.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            with pyro.plate("groups", len(obs)):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

        view = ModelView(model, torch.tensor([0.0, 3.0, 7.0, 2.0]), unit_plate="groups")
        mode = laplace_mode(view, view.init_theta)
        mode.converged, mode.theta

    :param ModelView view: the model (its whole unit plate is evaluated).
    :param theta0: starting point ``(p,)``.
    :param y_start: starting modes ``(N, k)``; default ``view.init_y``.
    :param float gtol: gradient tolerance (max-norm); default ``eps^(1/3)``
        of the dtype times ``max(1, |log p̃|)^(1/2)``.
    :param int max_eval: cap on evaluations of the log marginal.
    """
    theta = theta0.detach().clone().requires_grad_(True)
    y = view.init_y if y_start is None else y_start
    state = {"y": y.detach(), "n": 0}

    def closure():
        optimizer.zero_grad()
        state["n"] += 1
        try:
            value, result = laplace_log_marginal(view, theta, state["y"])
        except ValueError:  # no Laplace approximation at this trial point
            return torch.tensor(math.inf, dtype=theta.dtype)
        state["y"], state["result"], state["value"] = result.y, result, value.detach()
        (-value).backward()
        return -value.detach()

    optimizer = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=max_eval, max_eval=max_eval, tolerance_grad=0.0,
        tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe",
    )
    optimizer.step(closure)
    value, result = laplace_log_marginal(view, theta, state["y"])
    (grad,) = torch.autograd.grad(value, theta)
    if gtol is None:
        gtol = torch.finfo(theta.dtype).eps ** (1 / 3) * max(1.0, abs(value.item())) ** 0.5
    grad_norm = grad.abs().max().item()
    warn_unconverged(result)
    return LaplaceMode(
        theta.detach(), value.detach(), result, grad_norm, state["n"] + 1, grad_norm <= gtol
    )
