"""Maximum likelihood with the unit latents integrated out by Laplace's method.

:func:`laplace_mle` is the glmmTMB / lme4 job in Pyro: the model's
``pyro.param`` sites are the parameters, its latent sites in the unit plate
are integrated out by :func:`~curvi.marginal.laplace_log_marginal`, and
L-BFGS with the exact gradient maximises the Laplace log likelihood. The
result reads like glmmTMB's summary: estimates, standard errors from the
Hessian of the log likelihood (central differences of the exact gradient,
as glmmTMB's ``optimHess``; the delta method for constrained parameters),
the log likelihood with every constant, AIC and BIC.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.runtime import Message
from torch.distributions import biject_to

from . import distributed
from .factors import FactorView, unit_plates
from .marginal import _check_quadrature, central_hessian, laplace_log_marginal, maximise_laplace
from .model import ModelView
from .modes import NoLaplaceApproximation, warn_unconverged
from .quadrature import quadrature_log_marginal


class LaplaceFit:
    """The result of :func:`laplace_mle`.

    :ivar dict params: the estimates, constrained, by parameter name.
    :ivar float log_likelihood: the Laplace log likelihood at the estimates,
        every constant included (comparable with glmmTMB's ``logLik``).
    :ivar dict std_errors: standard errors by parameter name.
    :ivar torch.Tensor covariance: covariance of the unconstrained parameters
        (inverse Hessian of the negative log likelihood), in the order of
        ``params``.
    :ivar dict modes: conditional modes of the local sites at the estimates.
    :ivar bool converged: whether the gradient fell below the tolerance.
    :ivar str message: how the optimiser stopped.
    :ivar int num_iterations: L-BFGS iterations.
    :ivar int num_evaluations: evaluations of the Laplace log likelihood (and its gradient).
    :ivar int num_observations: observed elements (for BIC).
    :ivar int num_nodes: quadrature nodes per dimension of the units'
        integrals (1: Laplace's method).
    :ivar float quadrature_error: under ``quadrature="auto"``, the change of
        the log likelihood from the previous number of nodes tried (nats).
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        log_likelihood: float,
        std_errors: dict[str, torch.Tensor],
        covariance: torch.Tensor,
        modes: dict[str, torch.Tensor],
        converged: bool,
        message: str,
        num_iterations: int,
        num_evaluations: int,
        num_observations: int,
        constraints: dict[str, torch.distributions.constraints.Constraint],
    ):
        #: free (unconstrained) dimensions: a 2×2 correlation Cholesky factor counts 1
        self.params, self.log_likelihood, self.std_errors = params, log_likelihood, std_errors
        self.covariance, self.modes = covariance, modes
        self.converged, self.message = converged, message
        self.num_iterations, self.num_evaluations = num_iterations, num_evaluations
        self.num_observations, self._constraints = num_observations, constraints
        self.num_nodes, self.quadrature_error = 1, math.nan

    @property
    def num_params(self) -> int:
        """Free parameters: the dimension of the unconstrained space."""
        return self.covariance.shape[0]

    @property
    def aic(self) -> float:
        return -2 * self.log_likelihood + 2 * self.num_params

    @property
    def bic(self) -> float:
        return -2 * self.log_likelihood + self.num_params * math.log(self.num_observations)

    def summary(self) -> str:
        """A glmmTMB-style table: estimates, standard errors and, for
        unconstrained parameters, Wald z values and p values."""
        lines = [
            (
                "Laplace maximum likelihood (curvi.laplace_mle)"
                if self.num_nodes == 1
                else f"Adaptive Gauss-Hermite maximum likelihood, {self.num_nodes} nodes per "
                "dimension (curvi.laplace_mle)"
            ),
            f"     logLik {self.log_likelihood:12.6f}   AIC {self.aic:10.4f}   "
            f"BIC {self.bic:10.4f}   ({self.num_observations} observations, "
            f"{self.num_params} parameters)",
            f"     {self.message}",
            "",
            f"{'':<16} {'Estimate':>11} {'Std. Error':>11} {'z value':>9} {'Pr(>|z|)':>10}",
        ]
        normal = torch.distributions.Normal(0.0, 1.0)
        for name, value in self.params.items():
            se = self.std_errors[name]
            real = self._constraints[name] is torch.distributions.constraints.real
            for index in itertools.product(*map(range, value.shape)):
                v, s = value[index].item(), se[index].item()
                if s == 0 and value.numel() > 1:
                    continue  # fixed by the constraint (e.g. a Cholesky factor's diagonal)
                label = f"{name}[{','.join(map(str, index))}]" if index else name
                row = f"{label:<16} {v:11.6f} {s:11.6f}"
                if real and s > 0:
                    z = v / s
                    p = 2 * normal.cdf(torch.tensor(-abs(z), dtype=torch.float64)).item()
                    row += f" {z:9.3f} {p:10.3g}"
                lines.append(row)
        return "\n".join(lines)

    def __str__(self):
        return self.summary()

    def __repr__(self):
        return (
            f"LaplaceFit(log_likelihood={self.log_likelihood:.6f}, converged={self.converged}, "
            f"params={ {k: v.tolist() for k, v in self.params.items()} })"
        )


def laplace_mle(
    model: Callable,
    *args,
    unit_plate: str | tuple[str, ...],
    gtol: float | None = None,
    max_eval: int = 500,
    init_loc_fn: Callable[[Message], torch.Tensor] = init_to_median,
    check_structure: bool = True,
    quadrature: int | str | None = None,
    **kwargs,
) -> LaplaceFit:
    """Maximum likelihood over the ``pyro.param`` sites of ``model``, its unit
    latents integrated out by Laplace's method (as glmmTMB and lme4 do).

    The parameters start at their values in the param store (their
    ``pyro.param`` initial values on a fresh store) and are optimised in
    place, so after the call ``pyro.param(name)`` holds the estimate.

    Usage::

        import pyro, pyro.distributions as dist
        from torch.distributions import constraints
        from curvi.datasets import load_cbpp

        def model(design, herd, size, incidence):
            beta = pyro.param("beta", torch.zeros(4, dtype=torch.float64))
            sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64),
                               constraint=constraints.positive)
            with pyro.plate("herds", 15):
                u = pyro.sample("u", dist.Normal(0.0, sigma))
            with pyro.plate("obs", len(herd)):
                pyro.sample("y", dist.Binomial(size, logits=design @ beta + u[herd]),
                            obs=incidence)

        pyro.clear_param_store()
        data = load_cbpp(dtype=torch.float64)
        fit = laplace_mle(model, data.design, data.herd, data.size, data.incidence,
                          unit_plate="herds")
        print(fit)  # logLik -92.026282, beta[0] -1.398532 (SE 0.232472), ...

    :param callable model: a Pyro model with ``pyro.param`` sites and one unit
        plate holding its latent sites (no global latent sites).
    :param unit_plate: the name of the plate of the unit latents; for
        several grouping factors (crossed or nested random effects), a tuple
        of plate names (:class:`~curvi.factors.FactorView`): their units are
        integrated out jointly through a sparse Hessian.
    :param float gtol: gradient tolerance (max-norm) for convergence; default
        ``1e-6 · max(1, |log L|)`` in float64.
    :param int max_eval: cap on evaluations of the log likelihood.
    :param quadrature: as glmer's ``nAGQ``: integrate the units by adaptive
        Gauss–Hermite quadrature with this many nodes per dimension
        (:func:`~curvi.quadrature.quadrature_log_marginal`; 1 is Laplace), or
        ``"auto"``: fit by Laplace, choose the nodes that move the log
        likelihood by less than 0.01 nat there, and refit with them. The fit
        reports the nodes used (``num_nodes``) and, under "auto", the last
        change (``quadrature_error``).
    :returns: a :class:`LaplaceFit`.
    :raises ValueError: when the model has global latent sites or no
        ``pyro.param`` sites.
    """
    if unit_plates(unit_plate) is not None:
        view = FactorView(model, *args, unit_plate=unit_plate, init_loc_fn=init_loc_fn, **kwargs)
    else:
        view = ModelView(
            model,
            *args,
            unit_plate=unit_plate[0] if isinstance(unit_plate, (tuple, list)) else unit_plate,
            init_loc_fn=init_loc_fn,
            check_structure=check_structure,
            **kwargs,
        )
    if view.global_dim:
        raise ValueError(
            f"laplace_mle integrates out only the unit latents; the model's global latent "
            f"sites {list(view.global_sites)} must be pyro.param sites (or fit the model "
            "with LaplaceMarginal for a Bayesian treatment)"
        )
    if not view.param_sites:
        raise ValueError("laplace_mle: the model has no pyro.param sites to estimate")
    store = pyro.get_param_store()
    leaves = dict(store.named_parameters())
    names = list(view.param_sites)
    params = [leaves[name] for name in names]
    _check_quadrature(quadrature)
    if isinstance(view, FactorView) and quadrature not in (None, 1):
        raise ValueError(
            "quadrature= integrates one unit plate's units one by one; with several grouping "
            "factors the units are integrated jointly, by Laplace"
        )
    if distributed.is_sharded():  # processes sharing the units start from rank 0's values
        with torch.no_grad():
            for param in params:
                param.copy_(distributed.broadcast(param, "the initial parameters"))
    theta = view.init_theta
    nodes = 1 if quadrature in (None, "auto") else quadrature
    error = math.nan
    y, nfev, nit = maximise_laplace(
        view, params, lambda: theta, max_eval=max_eval, create_graph=True, quadrature=_rule(nodes)
    )
    if quadrature == "auto":
        found = quadrature_log_marginal(view, theta, y, num_nodes="auto", create_graph=True)
        nodes, error = found.num_nodes, found.error
        if nodes > 1:
            y, more_evaluations, more_iterations = maximise_laplace(
                view,
                params,
                lambda: theta,
                y_start=found.modes.y,
                max_eval=max_eval,
                create_graph=True,
                quadrature=nodes,
            )
            nfev, nit = nfev + more_evaluations + 1, nit + more_iterations
    value, gradient, result = _value_and_gradient(view, theta, y, params, _rule(nodes))
    covariance = _covariance(view, theta, result.y, params, _rule(nodes))
    polished = _newton_polish(view, theta, params, covariance, value, gradient, result, _rule(nodes))
    skipped = polished is None
    value, gradient, result = (value, gradient, result) if skipped else polished
    nfev += int(bool(torch.isfinite(covariance).all()))  # the polishing step, where one was tried
    warn_unconverged(result)
    if gtol is None:
        gtol = 1e-6 * max(1.0, abs(value))
    grad_norm = gradient.abs().max().item()
    converged = grad_norm <= gtol
    message = (
        f"converged: max |gradient| {grad_norm:.2g} <= {gtol:.2g} after {nit} iterations"
        if converged
        else f"not converged: max |gradient| {grad_norm:.2g} > {gtol:.2g} after {nit} iterations"
    )
    if skipped:
        message += " (the final Newton step was not taken: it did not raise log L and lower the gradient)"
    constraints = {name: store._constraints[name] for name in names}
    estimates, std_errors = _delta_method(names, params, constraints, covariance)
    # every unit's modes, as one process holds them (gathered from the processes sharing them)
    modes = {k: v.detach() for k, v in view.unpack(theta, distributed.gather_units(result.y)).items()}
    fit = LaplaceFit(
        estimates,
        value,
        std_errors,
        covariance,
        modes,
        converged,
        message,
        nit,
        nfev,
        int(distributed.sum_values(view.num_observations, what="the number of observations")[0]),
        constraints,
    )
    fit.num_nodes, fit.quadrature_error = nodes, error
    return fit


def _rule(nodes):
    """The ``quadrature`` argument of the marginal for ``nodes`` per dimension."""
    return None if nodes == 1 else nodes


def _value_and_gradient(view, theta, y, params, quadrature=None):
    """The Laplace log likelihood and its gradient in the unconstrained params."""
    try:
        value, result = laplace_log_marginal(view, theta, y, create_graph=True, quadrature=quadrature)
        failure = None
    except NoLaplaceApproximation as error:
        failure = error
    # processes sharing the units fail together, before their sums
    if distributed.any_rank(failure is not None, "the Laplace marginal's existence"):
        raise failure or NoLaplaceApproximation("the Laplace approximation does not exist on another process")
    grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
    gradient = torch.cat([g.reshape(-1) for g in grads])
    # processes sharing the units: their shares summed
    gradient = distributed.sum_tensor(gradient, what="the log likelihood's gradient")
    return distributed.sum_values(value, what="the log likelihood")[0], gradient, result


def _set_params(params, x):
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(x[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()


def _newton_polish(view, theta, params, covariance, value, gradient, result, quadrature=None):
    """One Newton step from where L-BFGS stopped, with the Hessian the
    standard errors come from (``covariance``): the estimate becomes as
    precise as the gradient, not only as the stopping tolerance, so runs
    that stop at different points (another start, units summed in another
    order or over processes) agree. Kept only where it raises log L (to
    rounding) and lowers the gradient: ``(value, gradient, modes)`` there,
    else None with the params put back."""
    if not torch.isfinite(covariance).all():
        return None
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    _set_params(params, flat + covariance @ gradient)
    try:
        polished = _value_and_gradient(view, theta, result.y, params, quadrature)
    except NoLaplaceApproximation:
        polished = None
    slack = 1e-12 * max(1.0, abs(value))
    if polished is None or not (
        polished[0] >= value - slack and polished[1].abs().max() <= gradient.abs().max()
    ):
        _set_params(params, flat)
        return None
    return polished


def _covariance(view, theta, y, params, quadrature=None):
    """Inverse Hessian of −log L in the unconstrained params, by central
    differences of the exact gradient (glmmTMB's optimHess does the same)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def gradient(x):
        _set_params(params, x)
        return _value_and_gradient(view, theta, y, params, quadrature)[1]

    hessian = central_hessian(gradient, flat)
    gradient(flat)  # leave the params at the estimate
    lam = torch.linalg.eigvalsh(-hessian)
    # no curvature (or the wrong sign) along some direction, to the precision
    # of central differences (eps^½ relative): the inverse would be noise
    if not lam[0] > torch.finfo(lam.dtype).eps ** 0.5 * lam[-1].abs():
        _warn_not_identified(view.param_sites, params, -hessian)
        return torch.full_like(hessian, math.nan)
    return torch.linalg.inv(-hessian)


def _warn_not_identified(names, params, information):
    """Warn that the observed information is not positive definite, naming
    the parameters along its least curved direction."""
    labels = [
        name if p.numel() == 1 else f"{name}[{i}]" for name, p in zip(names, params) for i in range(p.numel())
    ]
    lam, vectors = torch.linalg.eigh(information)
    direction = vectors[:, 0].abs()
    along = [label for label, w in zip(labels, direction.tolist()) if w >= 0.1 * float(direction.max())]
    warnings.warn(
        "laplace_mle: the Hessian of the log likelihood at the estimate is not negative definite to "
        f"working precision (curvature {0.0 - float(lam[0]):.3g} along {', '.join(along)}): the data "
        "do not identify those parameters, or the optimum was not reached; the standard errors are NaN",
        RuntimeWarning,
        stacklevel=3,
    )


def _delta_method(names, params, constraints, covariance):
    """Constrained estimates and their standard errors ``sqrt(diag(J C Jᵀ))``."""
    estimates, std_errors, offset = {}, {}, 0
    for name, param in zip(names, params):
        n = param.numel()
        transform = biject_to(constraints[name])
        u = param.detach()
        x = transform(u)
        jac = torch.autograd.functional.jacobian(lambda v: transform(v).reshape(-1), u).reshape(x.numel(), n)  # noqa: B023
        block = covariance[offset : offset + n, offset : offset + n]
        std_errors[name] = (jac @ block @ jac.T).diagonal().sqrt().reshape(x.shape)
        estimates[name] = x
        offset += n
    return estimates, std_errors
