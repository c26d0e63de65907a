"""Laplace-marginal inference: the unit latents integrated out by Laplace's method.

For a model with globals θ and unit latents y (docs/design.md §5)::

    log p̃(θ, z) = log p(θ, ŷ(θ), z) + (N k / 2) log 2π − ½ Σᵢ log det(−Dᵢ(θ, ŷ(θ)))

with ŷ(θ) the units' conditional modes and Dᵢ their Hessian blocks, all in
unconstrained coordinates. It is what TMB, glmmTMB and Stan's embedded
Laplace compute. Its gradient is exact: the implicit derivative of ŷ
(:func:`~curvi.modes.implicit_modes`) and the derivative of the unit blocks
(third derivatives of log p, from a differentiable :func:`local_hessian`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.runtime import Message

from . import distributed
from .checks import check_count
from .factors import FactorView, unit_plates
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
from .quadrature import quadrature_log_marginal
from .sparse_laplace import solve_joint_modes, sparse_log_marginal
from .tensor_ops import symmetrize

__all__ = [
    "LaplaceMarginal",
    "LaplaceMode",
    "NoLaplaceApproximation",
    "central_hessian",
    "laplace_hessian",
    "laplace_log_marginal",
    "laplace_mode",
    "maximise_laplace",
]


def laplace_log_marginal(
    view: ModelView,
    theta: torch.Tensor,
    y_start: torch.Tensor,
    *,
    units: torch.Tensor | None = None,
    xtol: float | None = None,
    max_iter: int = 50,
    create_graph: bool | None = None,
    quadrature: int | str | None = None,
) -> tuple[torch.Tensor, ModeResult]:
    """The Laplace approximation of ``log p(θ, z)`` with the units integrated out.

    With ``quadrature=K`` the units' integrals are adaptive Gauss–Hermite
    with K nodes per dimension instead (:func:`~curvi.quadrature.quadrature_log_marginal`;
    ``K = 1`` is Laplace, ``"auto"`` chooses K to 0.01 nat), as glmer's ``nAGQ``.

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
    :param bool create_graph: build the graph for the gradient; default
        ``theta.requires_grad``. Pass True to differentiate with respect to
        ``pyro.param`` leaves the model reads.
    :returns: ``(value, modes)``, the scalar log marginal and the
        :class:`~curvi.modes.ModeResult`.
    :raises NoLaplaceApproximation: (a ValueError) when a unit's Hessian
        block is not negative definite at its mode (the Laplace
        approximation does not exist there).
    """
    if isinstance(view, FactorView):
        if quadrature is not None or units is not None:
            raise ValueError(
                "several grouping factors are integrated by Laplace over all units at once: "
                "quadrature= and units= are for one unit plate"
            )
        return sparse_log_marginal(
            view, theta, y_start, xtol=xtol, max_iter=max_iter, create_graph=create_graph
        )
    if quadrature is not None:
        found = quadrature_log_marginal(
            view,
            theta,
            y_start,
            num_nodes=quadrature,
            units=units,
            xtol=xtol,
            max_iter=max_iter,
            create_graph=create_graph,
        )
        return found.value, found.modes
    create_graph = theta.requires_grad if create_graph is None else create_graph
    result = solve_modes(view, theta, y_start, units=units, xtol=xtol, max_iter=max_iter)
    y = implicit_modes(view, theta, result, units=units, create_graph=create_graph)
    log_prob, _, D = local_hessian(view, theta, y, units=units, create_graph=create_graph)
    scale = view.unit_scale(y.shape[0])
    L = mode_cholesky(-D / scale, units)  # one unit's own precision block
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
    :ivar converged: whether ``grad_norm`` fell below the tolerance, or the
        quasi-Newton step left is below :data:`STEP_SDS` posterior sds in
        every coordinate (what decides on large data).
    """

    theta: torch.Tensor
    log_marginal: torch.Tensor
    modes: ModeResult
    grad_norm: float
    num_evaluations: int
    converged: bool


def laplace_mode(
    view: ModelView,
    theta0: torch.Tensor,
    *,
    y_start: torch.Tensor | None = None,
    gtol: float | None = None,
    max_eval: int = 200,
) -> LaplaceMode:
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
    :param float gtol: gradient tolerance (max-norm; the mode is also accepted
        where the quasi-Newton step left is below :data:`STEP_SDS` posterior
        sds); default ``eps^(1/3)``
        of the dtype times ``max(1, |log p̃|)^(1/2)``.
    :param int max_eval: cap on evaluations of the log marginal.
    """
    # processes sharing the units start from rank 0's point
    theta = distributed.broadcast(theta0.detach(), "the starting point").clone().requires_grad_(True)
    y, nfev, _, inverse_hessian = _maximise(view, [theta], lambda: theta, y_start=y_start, max_eval=max_eval)
    try:
        value, result = laplace_log_marginal(view, theta, y)
        failure = None
    except NoLaplaceApproximation as error:
        failure = error
    if distributed.any_rank(failure is not None, "the Laplace marginal's existence"):
        raise failure or NoLaplaceApproximation("the Laplace approximation does not exist on another process")
    (grad,) = torch.autograd.grad(value, theta)
    grad = distributed.sum_tensor(grad, what="the Laplace marginal's gradient")
    value = value.new_tensor(distributed.sum_values(value, what="the Laplace marginal")[0])
    if gtol is None:
        gtol = torch.finfo(theta.dtype).eps ** (1 / 3) * max(1.0, abs(value.item())) ** 0.5
    grad_norm = grad.abs().max().item()
    warn_unconverged(result)
    converged = grad_norm <= gtol or _step_in_sds(inverse_hessian, grad) <= STEP_SDS
    return LaplaceMode(theta.detach(), value.detach(), result, grad_norm, nfev + 1, converged)


#: :func:`laplace_mode` has converged where the Newton step left is below this
#: many posterior sds in every coordinate (or the gradient is below ``gtol``)
STEP_SDS = 1e-3


def _step_in_sds(inverse_hessian, grad):
    """The largest coordinate of the quasi-Newton step ``H⁻¹g`` in posterior
    sds ``sqrt(diag H⁻¹)``, H L-BFGS's curvature of −log p̃ (no extra
    evaluation); ``inf`` without one. A gradient tolerance alone misjudges
    large data: at 10⁵ units the gradient L-BFGS leaves at the optimum, to
    rounding, is above an absolute tolerance while the step it asks for is a
    ten-thousandth of a posterior sd. (The joint Schur complement will not do
    here: it can be indefinite at the marginal's mode, design.md §4.6.)"""
    if inverse_hessian is None:
        return math.inf
    eye = torch.eye(grad.numel(), dtype=grad.dtype, device=grad.device)
    variances = torch.stack([inverse_hessian(e)[i] for i, e in enumerate(eye)])
    if not (variances > 0).all():
        return math.inf
    return float((inverse_hessian(grad).abs() / variances.sqrt()).max())


def central_hessian(
    gradient_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, step: float = 1e-5
) -> torch.Tensor:
    """Hessian by central differences of an exact gradient, symmetrised.

    ``gradient_fn(x)`` returns the gradient at ``x`` (a 1-d tensor). The
    Laplace log marginal has an exact gradient at every point but no cheap
    exact Hessian (autograd through the one-step modes gets second
    derivatives wrong, as the unit blocks are detached there), so its
    curvature is taken this way, as glmmTMB's ``optimHess`` does; the error
    is O(step²).

    Usage::

        central_hessian(lambda x: -2 * x, torch.ones(3))  # -2 I
    """
    x = x.detach()
    columns = []
    for e in torch.eye(x.numel(), dtype=x.dtype, device=x.device):
        h = step * max(1.0, abs((x * e).sum().item()))
        columns.append((gradient_fn(x + h * e) - gradient_fn(x - h * e)) / (2 * h))
    hessian = torch.stack(columns, dim=-1)
    return symmetrize(hessian)


def laplace_hessian(
    view: ModelView,
    theta: torch.Tensor,
    y_start: torch.Tensor,
    *,
    units: torch.Tensor | None = None,
    step: float = 1e-5,
    quadrature: int | None = None,
) -> torch.Tensor:
    """Hessian of the Laplace log marginal in θ, ``(p, p)``, by central
    differences of its exact gradient (:func:`central_hessian`); of the
    quadrature log marginal with ``quadrature=K`` nodes per dimension.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", len(obs)):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

        view = ModelView(model, torch.tensor([0.3, 1.2]), unit_plate="groups")
        laplace_hessian(view, torch.zeros(1), view.init_y)  # -(1 + 2 / 1.25)
    """
    y = y_start.detach()

    def gradient(t):
        with torch.enable_grad():  # also from read-outs under no_grad
            t = t.clone().requires_grad_(True)
            value, _ = laplace_log_marginal(view, t, y, units=units, quadrature=quadrature)
            gradient = torch.autograd.grad(value, t)[0]
        return distributed.sum_tensor(gradient, what="the Laplace marginal's gradient")

    return central_hessian(gradient, theta, step=step)


def maximise_laplace(
    view: ModelView,
    params: Sequence[torch.Tensor],
    theta_fn: Callable[[], torch.Tensor],
    *,
    y_start: torch.Tensor | None = None,
    max_eval: int = 200,
    create_graph: bool | None = None,
    quadrature: int | None = None,
) -> tuple[torch.Tensor, int, int]:
    """L-BFGS (strong Wolfe) on ``−log p̃`` over the leaf tensors ``params``.

    ``theta_fn()`` gives the global coordinates at the current ``params``
    (``params`` may be θ itself, or ``pyro.param`` leaves the model reads).
    ``quadrature=K`` maximises the adaptive Gauss–Hermite log marginal
    instead (a fixed number of nodes: "auto" would make it jump).
    The units' modes are warm-started by a secant predictor: L-BFGS's trial
    points lie on lines, along which the modes move smoothly, so each solve
    starts from the modes extrapolated from the last two evaluations. The
    inner solves stop at ``eps^(1/3)``: the implicit step squares that error.

    :returns: ``(modes, evaluations, iterations)``; ``params`` hold the optimum.
    """
    y, evaluations, iterations, _ = _maximise(
        view,
        params,
        theta_fn,
        y_start=y_start,
        max_eval=max_eval,
        create_graph=create_graph,
        quadrature=quadrature,
    )
    return y, evaluations, iterations


def _maximise(view, params, theta_fn, *, y_start=None, max_eval=200, create_graph=None, quadrature=None):
    """:func:`maximise_laplace`, also returning L-BFGS's inverse curvature
    ``v ↦ H⁻¹v`` at the end (None without history)."""
    xtol = torch.finfo(params[0].dtype).eps ** (1 / 3)
    predictor = _ModePredictor(view.init_y if y_start is None else y_start)
    state = {"n": 0, "best": (math.inf, None)}  # the best point evaluated

    def closure():
        optimizer.zero_grad()
        state["n"] += 1
        x = torch.cat([p.detach().reshape(-1) for p in params])
        if not torch.isfinite(x).all():  # a line search whose bracket collapsed (t = NaN)
            return torch.tensor(math.inf, dtype=x.dtype)
        try:
            value, result = laplace_log_marginal(
                view, theta_fn(), predictor(x), xtol=xtol, create_graph=create_graph, quadrature=quadrature
            )
            failed = False
        except NoLaplaceApproximation:  # reject this trial point
            failed = True
        # processes sharing the units reject a point together, and sum their shares
        if distributed.any_rank(failed, "the Laplace marginal's existence"):
            return torch.tensor(math.inf, dtype=x.dtype)
        predictor.update(x, result.y)
        (-value).backward()
        distributed.sum_gradients(params, what="the Laplace marginal's gradient")
        (total,) = distributed.sum_values(value, what="the Laplace marginal")
        if -total < state["best"][0]:
            state["best"] = (-total, x)
        return torch.tensor(-total, dtype=x.dtype)

    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_eval,
        max_eval=max_eval,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    optimizer.step(closure)
    best = state["best"][1]
    if best is not None and not all(torch.isfinite(p).all() for p in params):
        # on a flat or inconsistent objective (a unit without a mode, say) the
        # strong-Wolfe search can end on t = NaN: go back to the best point
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(best, params)
    lbfgs = optimizer.state[optimizer._params[0]]
    iterations = lbfgs.get("n_iter", 0)
    return predictor.last, state["n"], iterations, _inverse_curvature(lbfgs)


def _inverse_curvature(lbfgs):
    """``v ↦ H⁻¹v`` from an L-BFGS state's history (torch's two-loop
    recursion), or None when it has none."""
    dirs, steps, ro = lbfgs.get("old_dirs"), lbfgs.get("old_stps"), lbfgs.get("ro")
    if not dirs or lbfgs.get("H_diag") is None:
        return None
    h_diag, ro = lbfgs["H_diag"], ro[: len(dirs)]

    def apply(v):
        q, alphas = v.clone(), []
        for y, s, r in zip(reversed(dirs), reversed(steps), reversed(ro)):
            a = s.dot(q) * r
            q = q - a * y
            alphas.append(a)
        q = q * h_diag
        for y, s, r, a in zip(dirs, steps, ro, reversed(alphas)):
            q = q + (a - y.dot(q) * r) * s
        return q

    return apply


class _ModePredictor:
    """Starting modes for a new point ``x`` from the last two solved points:
    linear extrapolation along the line through them (exact to first order
    for points on that line, as within a line search)."""

    def __init__(self, y):
        self.history = []  # the last two solved (x, y)
        self.last = y.detach()

    def __call__(self, x):
        if len(self.history) < 2:
            return self.last
        (xa, ya), (xb, yb) = self.history
        d = xb - xa
        dd = (d * d).sum()
        if not dd > 0:
            return yb
        s = ((x - xb) * d).sum() / dd
        if not -4.0 <= s <= 4.0:  # far off the line: do not trust the secant
            return yb
        return yb + s * (yb - ya)

    def update(self, x, y):
        self.last = y.detach()
        self.history = (self.history + [(x, self.last)])[-2:]


class LaplaceMarginal:
    """A Pyro model over the global sites of ``model``, the unit latents
    integrated out by Laplace's method.

    Calling it runs ``model`` with every site but the global latents hidden
    (so those keep their priors, visible to NUTS, guides and init
    strategies) and adds one factor, the Laplace log likelihood
    ``log p̃(θ, z) − log p(θ)`` with its exact gradient. ``pyro.infer.NUTS``,
    ``SVI`` with any autoguide, or MAP run on it unchanged;
    :meth:`sample_locals` then draws the units from ``N(ŷ(θ), Dᵢ(θ)⁻¹)``
    for each draw of θ, giving joint posterior draws.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer import MCMC, NUTS

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = pyro.sample("tau", dist.HalfNormal(1.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, tau))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

        obs = torch.poisson(torch.full((6, 4), 3.0))
        marginal = LaplaceMarginal(model, unit_plate="groups")
        mcmc = MCMC(NUTS(marginal), warmup_steps=50, num_samples=50, disable_progbar=True)
        mcmc.run(obs)
        draws = mcmc.get_samples()                    # mu, tau
        units = marginal.sample_locals(draws, obs)    # u, one draw per draw of θ
        units["u"].shape  # (50, 6, 1)

    :param callable model: a Pyro model with one unit plate (not subsampled).
    :param unit_plate: the name of the plate of the unit latents; for
        several grouping factors (crossed or nested random effects) a tuple
        of plate names: their units are integrated out jointly through a
        sparse Hessian (:class:`~curvi.factors.FactorView`), and
        :meth:`sample_locals` draws them jointly.
    :param callable init_loc_fn: init strategy for the view's initial point.
    :param bool check_structure: check that units couple only through θ.
    :param float xtol: Newton step tolerance for the modes.
    :param int max_iter: Newton iteration cap per evaluation.
    :param quadrature: integrate the units by adaptive Gauss–Hermite
        quadrature with this many nodes per dimension instead of Laplace's
        method (:func:`~curvi.quadrature.quadrature_log_marginal`), or
        ``"auto"``: the number that moves the log marginal by less than
        0.01 nat at the Laplace mode of θ, chosen at the first call and then
        held (a sampler needs one smooth density); :attr:`num_nodes` and
        :attr:`quadrature_error` report it.
    """

    def __init__(
        self,
        model: Callable,
        *,
        unit_plate: str,
        init_loc_fn: Callable[[Message], torch.Tensor] = init_to_median,
        check_structure: bool = True,
        xtol: float | None = None,
        max_iter: int = 50,
        quadrature: int | str | None = None,
    ):
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        _check_quadrature(quadrature)
        if isinstance(unit_plate, (tuple, list)) and len(unit_plate) == 1:
            unit_plate = unit_plate[0]  # one grouping factor: the arrowhead path
        self.model, self.unit_plate = model, unit_plate
        self.init_loc_fn, self.check_structure = init_loc_fn, check_structure
        self.xtol, self.max_iter = xtol, max_iter
        self.quadrature = quadrature
        #: nodes per dimension in use (1: Laplace); under "auto", set at the first call
        self.num_nodes = None if quadrature == "auto" else (quadrature or 1)
        #: under "auto", the change from the previous number of nodes tried (nats)
        self.quadrature_error = math.nan
        self.view = None
        self._modes = None

    def _view(self, args, kwargs):
        if distributed.world_size() > 1:
            raise ValueError(
                "LaplaceMarginal is a model for MCMC in one process; under torch.distributed fit "
                "the units shared among processes with AmortizedLaplaceGuide or laplace_mle"
            )
        if self.view is None and unit_plates(self.unit_plate) is not None:
            if self.quadrature is not None:
                raise ValueError(
                    "quadrature= integrates one unit plate's units one by one; with several "
                    "grouping factors the units are integrated jointly, by Laplace"
                )
            self.view = FactorView(
                self.model, *args, unit_plate=self.unit_plate, init_loc_fn=self.init_loc_fn, **kwargs
            )
            self._modes = self.view.init_y
        if self.view is None:
            view = ModelView(
                self.model,
                *args,
                unit_plate=self.unit_plate,
                init_loc_fn=self.init_loc_fn,
                check_structure=self.check_structure,
                **kwargs,
            )
            if view.unit_indices is not None:
                raise ValueError(
                    f"LaplaceMarginal integrates out every unit of plate '{self.unit_plate}'; "
                    "it cannot be subsampled (remove subsample_size)"
                )
            self.view, self._modes = view, view.init_y
        return self.view.with_args(*args, **kwargs)

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        view = self._view(args, kwargs)
        global_sites = set(view.global_sites)

        def hidden(msg):
            return msg["type"] == "sample" and msg["name"] not in global_sites

        trace = poutine.trace(poutine.block(self.model, hide_fn=hidden)).get_trace(*args, **kwargs)
        values = {name: trace.nodes[name]["value"] for name in view.global_sites}
        for layout in view.global_layout:
            if values[layout.name].shape != layout.transform(torch.zeros(layout.shape)).shape:
                raise ValueError(
                    f"LaplaceMarginal does not support batched draws of the globals (site "
                    f"'{layout.name}' has shape {tuple(values[layout.name].shape)}): run it "
                    "without vectorized particles or parallel predictive plates"
                )
        theta = view.pack_globals(values)
        if self.num_nodes is None:
            self._choose_num_nodes(view)
        try:
            value, result = laplace_log_marginal(
                view,
                theta,
                self._modes,
                xtol=self.xtol,
                max_iter=self.max_iter,
                quadrature=None if self.num_nodes == 1 else self.num_nodes,
            )
        except NoLaplaceApproximation:  # reject this θ
            pyro.factor("laplace_log_likelihood", theta.new_tensor(-math.inf))
            return values
        warn_unconverged(result)
        self._modes = result.y
        pyro.factor("laplace_log_likelihood", value - _global_log_density(view, trace, theta))
        return values

    def _choose_num_nodes(self, view):
        """``quadrature="auto"``: the nodes that settle the log marginal at the
        Laplace mode of θ."""
        with torch.enable_grad():
            mode = laplace_mode(view, view.init_theta, y_start=self._modes)
            found = quadrature_log_marginal(view, mode.theta, mode.modes.y, num_nodes="auto")
        self.num_nodes, self.quadrature_error = found.num_nodes, found.error
        self._modes = found.modes.y

    @torch.no_grad()
    def sample_locals(
        self,
        theta_samples: dict[str, torch.Tensor],
        *args,
        generator: torch.Generator | None = None,
        resample: int | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        """Draws of the local sites given draws of the globals.

        For each draw of θ (``theta_samples``: constrained global values by
        site, leading dimension S, e.g. ``mcmc.get_samples()``) the units are
        drawn from their Laplace conditional ``N(ŷᵢ(θ), Dᵢ(θ)⁻¹)``; with
        ``resample=M``, each unit's draw is importance-resampled from M such
        proposals by the weights ``p(yᵢ | θ, z) / N(yᵢ; ŷᵢ, Dᵢ⁻¹)`` (its own
        terms of the log density), which corrects Laplace's Gaussian where a
        unit's posterior is skewed (binary data, few observations) -- the
        unit-level counterpart of ``quadrature=``.

        :returns: constrained values of every local site, leading dimension S.
        """
        if resample is not None:
            check_count("resample", resample, 1)
        view = self._view(args, kwargs)
        num = {v.shape[0] for v in theta_samples.values()}
        if len(num) != 1:
            raise ValueError(f"theta_samples disagree on the number of draws: {num}")
        draws = {name: [] for name in view.local_sites}
        y = self._modes
        if isinstance(view, FactorView):
            if resample is not None:
                raise ValueError("resample= needs one unit plate (each unit's own terms); got several")
            return _joint_draws(self, view, theta_samples, num.pop(), generator)
        for s in range(num.pop()):
            theta = view.pack_globals({n: v[s] for n, v in theta_samples.items()})
            result = solve_modes(view, theta, y, xtol=self.xtol, max_iter=self.max_iter)
            warn_unconverged(result)
            y = result.y
            L = torch.linalg.cholesky(result.precision)
            sample = _laplace_draws(view, theta, y, L, resample or 1, generator)
            values = view.unpack(theta, sample)
            for name in view.local_sites:
                draws[name].append(values[name])
        return {name: torch.stack(v) for name, v in draws.items()}


def _joint_draws(marginal, view, theta_samples, num, generator):
    """Draws of all units' latents from their joint Laplace conditional
    ``N(x̂(θ), (−H)⁻¹)`` (sparse: CHOLMOD's factor), one per draw of θ."""
    draws = {name: [] for name in view.local_sites}
    x = marginal._modes
    for s in range(num):
        theta = view.pack_globals({n: v[s] for n, v in theta_samples.items()})
        modes = solve_joint_modes(view, theta, x, xtol=marginal.xtol, max_iter=marginal.max_iter)
        warn_unconverged(modes)
        x = modes.y + modes.step
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        factor = modes.pattern.lower.factor(modes.precision)
        sample = x + torch.as_tensor(factor.draw(eps.cpu().numpy()), dtype=x.dtype, device=x.device)
        values = view.unpack(theta, sample)
        for name in view.local_sites:
            draws[name].append(values[name])
    return {name: torch.stack(v) for name, v in draws.items()}


def _laplace_draws(view, theta, y, L, num_proposals, generator):
    """One draw per unit from N(ŷᵢ, (LᵢLᵢᵀ)⁻¹), importance-resampled from
    ``num_proposals`` proposals by each unit's own log density when > 1."""
    n, k = y.shape
    eps = torch.randn((num_proposals, n, k), generator=generator, dtype=y.dtype).to(y.device)
    proposals = y + torch.linalg.solve_triangular(L.mT, eps.unsqueeze(-1), upper=True).squeeze(-1)
    if num_proposals == 1:
        return proposals[0]
    with torch.no_grad():
        log_f = torch.stack([view.unit_log_joint(theta, p) for p in proposals])  # (M, n)
    log_w = log_f + 0.5 * (eps**2).sum(-1)  # − log N(y; ŷ, D⁻¹) up to a per-unit constant
    pick = torch.multinomial(torch.softmax(log_w, 0).T, 1, generator=generator).squeeze(-1)  # (n,)
    return proposals[pick, torch.arange(n, device=y.device)]


def _check_quadrature(quadrature):
    if quadrature is None or quadrature == "auto":
        return
    if isinstance(quadrature, bool) or not isinstance(quadrature, int) or quadrature < 1:
        raise ValueError(f"quadrature must be None, a positive int or 'auto', got {quadrature!r}")


def _global_log_density(view, trace, theta):
    """log p(θ) of the global sites as Pyro will count it (their priors, with
    scale and mask) plus their Jacobians (which inference in unconstrained
    space adds itself): what the factor must not count twice."""
    total = theta.new_zeros(())
    unconstrained = view.unpack_unconstrained(theta, view.init_y)
    for layout in view.global_layout:
        site = trace.nodes[layout.name]
        x = site["value"]
        log_p = site["fn"].log_prob(x, *site["args"], **site["kwargs"])
        total = total + scale_and_mask(log_p, site["scale"], site["mask"]).sum()
        u = unconstrained[layout.name]
        total = total + layout.transform.log_abs_det_jacobian(u, layout.transform(u)).sum()
    return total
