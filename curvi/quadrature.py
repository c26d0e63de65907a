"""Adaptive Gauss–Hermite quadrature over the units: the units' integrals
beyond Laplace's method (docs/design.md §10).

For unit i with log density fᵢ(y) = its own terms of log p(θ, y, z), mode
ŷᵢ and precision −∂²fᵢ = LᵢLᵢᵀ, the nodes are yᵢₘ = ŷᵢ + Lᵢ⁻ᵀxₘ for
probabilists' Gauss–Hermite nodes xₘ with weights wₘ (Σ wₘ = 1)::

    log ∫ e^{fᵢ} dyᵢ ≈ −log|Lᵢ| + (k/2) log 2π + logsumexpₘ[fᵢ(yᵢₘ) + ½|xₘ|² + log wₘ].

One node is Laplace's method. The rule is the tensor product of K nodes
per dimension for k ≤ 3 latents per unit, and a Smolyak sparse grid of the
same one-dimensional rules beyond (its weights can be negative). The value
is differentiable in θ *through* ŷᵢ(θ) (one differentiable Newton step,
:func:`~curvi.modes.implicit_modes`) and Lᵢ(θ) (third derivatives of log
p): holding the nodes fixed would bias the optimum.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from . import distributed
from .checks import check_count
from .hessian import local_hessian
from .model import ModelView
from .modes import (
    ModeResult,
    NoLaplaceApproximation,
    implicit_modes,
    mode_cholesky,
    solve_modes,
    warn_unconverged,
)

__all__ = [
    "AUTO_NODES",
    "LaplaceBias",
    "laplace_bias",
    "QuadratureLogMarginal",
    "gauss_hermite_rule",
    "quadrature_log_marginal",
    "unit_disagreement",
]

#: the numbers of nodes per dimension that ``num_nodes="auto"`` tries, in
#: order. Odd counts (a node at the mode), never 2 (worse than Laplace's
#: one, docs/design.md §10), and not from 1: Laplace and 3 nodes can agree
#: by chance -- on cbpp at glmer's estimate they differ by 0.009 nat while
#: both are 0.04 nat from the limit, which 5 and 7 nodes then approach.
AUTO_NODES = (3, 5, 7, 9, 11, 15, 21)
_PRODUCT_RULE_MAX_DIM = 3


class QuadratureLogMarginal(NamedTuple):
    """The result of :func:`quadrature_log_marginal`.

    :ivar value: the log marginal ``log p̂(θ, z)``, a scalar (with its graph).
    :ivar modes: the units' conditional modes (a :class:`~curvi.modes.ModeResult`).
    :ivar num_nodes: nodes per dimension used (chosen, under ``"auto"``).
    :ivar error: the change of the value from the previous number of nodes
        tried under ``"auto"`` (an error estimate, in nats); NaN otherwise.
    :ivar unit_log_integrals: each unit's log integral, ``(n,)`` (with its graph).
    """

    value: torch.Tensor
    modes: ModeResult
    num_nodes: int
    error: float
    unit_log_integrals: torch.Tensor


@lru_cache(maxsize=64)
def _hermite_1d(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    return x, w / w.sum()


@lru_cache(maxsize=64)
def _rule(num_nodes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if dim <= _PRODUCT_RULE_MAX_DIM or num_nodes == 1:
        x, w = _hermite_1d(num_nodes)
        nodes = np.array(list(itertools.product(x, repeat=dim))).reshape(-1, dim)
        weights = np.prod(np.array(list(itertools.product(w, repeat=dim))).reshape(-1, dim), axis=1)
        return nodes, weights
    # Smolyak's combination of products of 1..num_nodes-point rules:
    # Σ_{q−d+1 ≤ |l| ≤ q} (−1)^{q−|l|} C(d−1, q−|l|) U_{l₁} ⊗ … ⊗ U_{l_d}, q = num_nodes + d − 1
    q = num_nodes + dim - 1
    merged: dict[tuple, float] = {}
    for levels in itertools.product(range(1, num_nodes + 1), repeat=dim):
        total = sum(levels)
        if not q - dim + 1 <= total <= q:
            continue
        coefficient = (-1) ** (q - total) * math.comb(dim - 1, q - total)
        rules = [_hermite_1d(level) for level in levels]
        for point in itertools.product(*(zip(*rule) for rule in rules)):
            key = tuple(round(float(x), 12) for x, _ in point)
            merged[key] = merged.get(key, 0.0) + coefficient * math.prod(w for _, w in point)
    keys = [key for key, w in merged.items() if w != 0.0]
    return np.array(keys), np.array([merged[key] for key in keys])


def gauss_hermite_rule(
    num_nodes: int, dim: int, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``(M, dim)`` and weights ``(M,)`` (summing to 1) of the
    probabilists' Gauss–Hermite rule for ``E[g(x)]``, ``x ~ N(0, I_dim)``:
    the product of ``num_nodes`` nodes per dimension for ``dim ≤ 3``, a
    Smolyak sparse grid of the 1..``num_nodes``-node rules beyond (exact
    for polynomials of total degree ``2 num_nodes − 1``; some weights are
    negative).

    Usage::

        x, w = gauss_hermite_rule(3, 2)        # 9 nodes
        (w * x[:, 0] ** 2).sum()               # 1.0: E[x²] of a standard normal
        gauss_hermite_rule(3, 5)[0].shape      # the sparse grid: far fewer than 3⁵ nodes
    """
    check_count("num_nodes", num_nodes, 1)
    check_count("dim", dim, 1)
    nodes, weights = _rule(num_nodes, dim)
    return (
        torch.as_tensor(nodes, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


def quadrature_log_marginal(
    view: ModelView,
    theta: torch.Tensor,
    y_start: torch.Tensor,
    *,
    num_nodes: int | str = "auto",
    tol: float = 0.01,
    units: torch.Tensor | None = None,
    xtol: float | None = None,
    max_iter: int = 50,
    create_graph: bool | None = None,
) -> QuadratureLogMarginal:
    """``log p(θ, z)`` with the units integrated out by adaptive Gauss–Hermite
    quadrature (``num_nodes`` per dimension; 1 is Laplace's method).

    ``num_nodes="auto"`` raises the number of nodes through
    :data:`AUTO_NODES` (3, 5, 7, 9, ...) until the value moves by less than
    ``tol`` nats, and reports the number chosen and the last change.
    Differentiable in ``theta`` when it requires grad (or with
    ``create_graph``), through the modes and their curvature.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):                     # a Bernoulli random intercept
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

        obs = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        view = ModelView(model, obs, unit_plate="groups")
        theta = torch.zeros(1, requires_grad=True)
        result = quadrature_log_marginal(view, theta, view.init_y, num_nodes="auto")
        result.num_nodes, result.error       # the nodes chosen, the last change (< 0.01)
        result.value.backward()              # theta.grad: the exact gradient

    :param ModelView view: the model; every term involving a unit's latents
        must belong to that unit (in its plate, or indexed by it: long
        format), as the arrowhead structure requires.
    :param theta: global coordinates ``(p,)``.
    :param y_start: where the Newton solve for the modes starts, ``(n, k)``.
    :param num_nodes: nodes per dimension (``int ≥ 1``) or ``"auto"``.
    :param float tol: the change in nats at which ``"auto"`` stops.
    :param units: unit indices of the rows under a subsampled unit plate
        (unit terms scaled by ``N / n``).
    :raises NoLaplaceApproximation: (a ValueError) when a unit's Hessian
        block is not negative definite at its mode.
    :raises ValueError: for a bad ``num_nodes`` or ``tol``; when a sparse
        grid's integral of some unit is not positive (too few nodes for
        that many latents).
    """
    if not (num_nodes == "auto" or (isinstance(num_nodes, int) and not isinstance(num_nodes, bool))):
        raise ValueError(f"num_nodes must be a positive int or 'auto', got {num_nodes!r}")
    if num_nodes != "auto":
        check_count("num_nodes", num_nodes, 1)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    create_graph = theta.requires_grad if create_graph is None else create_graph
    result = solve_modes(view, theta, y_start, units=units, xtol=xtol, max_iter=max_iter)
    y = implicit_modes(view, theta, result, units=units, create_graph=create_graph)
    log_prob, _, D = local_hessian(view, theta, y, units=units, create_graph=create_graph)
    scale = view.unit_scale(y.shape[0])
    L = mode_cholesky(-D / scale, units)  # one unit's own precision block
    at_mode = view.unit_log_joint(theta, y, units=units) / scale  # one unit's own f at ŷ
    rest = log_prob - scale * at_mode.sum()

    def value_with(k_nodes):
        logs = _unit_log_integrals(view, theta, y, L, at_mode, k_nodes, units, scale)
        return rest + scale * logs.sum(), logs

    if num_nodes != "auto":
        value, logs = value_with(num_nodes)
        return QuadratureLogMarginal(value, result, num_nodes, math.nan, logs)
    previous = None
    for k_nodes in AUTO_NODES:
        value, logs = value_with(k_nodes)
        # the whole marginal's change (processes sharing the units decide together)
        (total,) = distributed.sum_values(value, what="the quadrature marginal")
        if previous is not None:
            change = abs(total - previous)
            if change < tol:
                return QuadratureLogMarginal(value, result, k_nodes, change, logs)
        previous = total
    raise ValueError(
        f"num_nodes='auto' did not settle to {tol:g} nats with up to {AUTO_NODES[-1]} nodes per "
        f"dimension (last change {change:.3g}); the units' posteriors are far from Gaussian: "
        "pass num_nodes= explicitly or check the model"
    )


def unit_disagreement(
    view: ModelView,
    theta: torch.Tensor,
    y_start: torch.Tensor,
    num_nodes: int,
    *,
    tol: float = 0.01,
    units: torch.Tensor | None = None,
) -> torch.Tensor:
    """The units (indices in the plate) whose log integral moves by more
    than ``tol`` nats between ``num_nodes`` and ``num_nodes + 2`` nodes per
    dimension: where the quadrature (or, with one node, Laplace) is least
    certain, e.g. groups with few binary observations.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 2.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

        obs = torch.tensor([[1.0, 1.0], [0.0, 1.0]])   # two binary observations per group
        view = ModelView(model, obs, unit_plate="groups")
        unit_disagreement(view, torch.zeros(1), view.init_y, 1)   # Laplace: both units flagged
        unit_disagreement(view, torch.zeros(1), view.init_y, 7)   # 7 nodes: none
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    with torch.no_grad():
        values = [
            quadrature_log_marginal(
                view, theta.detach(), y_start, num_nodes=k, units=units, create_graph=False
            ).unit_log_integrals
            for k in (num_nodes, num_nodes + 2)
        ]
    rows = ((values[0] - values[1]).abs() > tol).nonzero().flatten()
    return rows if units is None else units[rows]


class LaplaceBias(NamedTuple):
    """The result of :func:`laplace_bias`.

    :ivar shift: the estimated shift of θ's posterior mean from Laplace's
        integrals of the units to quadrature's, in posterior sds, ``(p,)``.
    :ivar max_shift: ``max |shift|``.
    :ivar log_marginal_change: log p̂_K − log p̂_1 at θ (nats).
    :ivar num_nodes: K.
    """

    shift: torch.Tensor
    max_shift: float
    log_marginal_change: float
    num_nodes: int


def laplace_bias(
    view: ModelView,
    theta: torch.Tensor,
    y_start: torch.Tensor,
    precision: torch.Tensor,
    *,
    num_nodes: int = 5,
) -> LaplaceBias:
    """How far Laplace's method over the units moves θ's posterior: the
    Newton step ``S⁻¹ ∇_θ(log p̂_K − log p̂_1)`` that the quadrature marginal
    would add to a posterior of precision ``S`` centred at ``theta``, in
    posterior sds. Two gradients of the marginal; a first-order estimate of
    the bias the benchmarks measure against NUTS.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, sigma))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

        obs = torch.bernoulli(torch.full((200, 3), 0.3))
        view = ModelView(model, obs, unit_plate="groups")
        bias = laplace_bias(view, view.init_theta, view.init_y, torch.eye(2) * 50.0)
        bias.shift       # in posterior sds of (mu, log sigma)

    :param precision: S, the precision of θ's posterior ``(p, p)`` (e.g. a
        guide's q(θ)).
    """
    p = view.global_dim
    if tuple(precision.shape) != (p, p):
        raise ValueError(
            f"precision must be the ({p}, {p}) precision of θ, got shape {tuple(precision.shape)}"
        )
    gradients, values = [], []
    for nodes in (1, num_nodes):
        t = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            try:
                found, failure = quadrature_log_marginal(view, t, y_start, num_nodes=nodes), None
            except NoLaplaceApproximation as error:
                failure = error
            # processes sharing the units fail together, before their sums
            if distributed.any_rank(failure is not None, "the marginal's existence"):
                raise failure or NoLaplaceApproximation(
                    "the Laplace approximation does not exist on another process"
                )
            (g,) = torch.autograd.grad(found.value, t)
        warn_unconverged(found.modes)
        # processes sharing the units: their shares summed
        gradients.append(distributed.sum_tensor(g, what="the marginal's gradient"))
        values.append(distributed.sum_values(found.value, what="the marginal")[0])
    step = torch.linalg.solve(precision, gradients[1] - gradients[0])
    shift = step / torch.linalg.inv(precision).diagonal().sqrt()
    return LaplaceBias(shift, shift.abs().max().item(), values[1] - values[0], num_nodes)


def _unit_log_integrals(view, theta, y, L, at_mode, num_nodes, units, scale):
    """Each unit's ``log ∫ exp fᵢ`` by the rule with ``num_nodes`` per dimension, ``(n,)``."""
    n, k = y.shape
    log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    const = 0.5 * k * math.log(2 * math.pi)
    if num_nodes == 1:  # Laplace's method: the single node is the mode
        return at_mode - log_det + const
    x, w = gauss_hermite_rule(num_nodes, k, dtype=y.dtype, device=y.device)
    terms = []
    for m in range(x.shape[0]):
        shift = torch.linalg.solve_triangular(L.mT, x[m].expand(n, k).unsqueeze(-1), upper=True).squeeze(-1)
        f = view.unit_log_joint(theta, y + shift, units=units) / scale
        terms.append(f - at_mode + 0.5 * (x[m] ** 2).sum())
    terms = torch.stack(terms, dim=-1)  # (n, M): f(yₘ) − f(ŷ) + ½|xₘ|², O(1) near the mode
    if (w > 0).all():
        log_sum = torch.logsumexp(terms + w.log(), dim=-1)
    else:  # sparse grid: signed weights
        log_sum = _signed_logsumexp(terms, w, units)
    return at_mode + log_sum - log_det + const


def _signed_logsumexp(terms, w, units):
    positive, negative = w > 0, w < 0
    log_p = torch.logsumexp(terms[:, positive] + w[positive].log(), dim=-1)
    log_n = torch.logsumexp(terms[:, negative] + (-w[negative]).log(), dim=-1)
    bad = ~(log_n < log_p)
    if bad.any():
        rows = bad.nonzero().flatten()
        rows = rows if units is None else units[rows]
        raise ValueError(
            f"the sparse grid's integral of {rows.numel()} units is not positive (units "
            f"{rows[:10].tolist()}): use more nodes per dimension"
        )
    return log_p + torch.log1p(-torch.exp(log_n - log_p))
