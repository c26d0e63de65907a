"""Is the answer good enough? Pareto-smoothed importance sampling of a guide.

:func:`psis` draws from a guide, weighs each draw by ``p / q`` and smooths the
weights' tail by ArviZ's PSIS (Vehtari, Simpson, Gelman, Yao & Gabry 2024,
JMLR 25(72)). The shape ``k̂`` of the generalised Pareto fitted to the
largest weights says how far the weighted estimates can be trusted:

* ``k̂ < 0.5``: the importance-weighted estimates converge well (and the
  guide is close to the posterior);
* ``0.5 ≤ k̂ < 0.7``: usable, with slower convergence;
* ``k̂ ≥ 0.7``: unreliable -- the guide misses mass the posterior has.

For a Laplace guide with a unit plate the check is *collapsed*: draws of the
globals θ from q(θ) are weighed by ``p̂(θ, z) / q(θ)`` with the units
integrated out by adaptive quadrature (:mod:`curvi.quadrature`), so the
weights test q(θ) alone, in p dimensions instead of p + N k. For any other
guide (Pyro's autoguides included) the draws are of every latent and the
weights ``p(x, z) / q(x)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO

from .checks import check_count
from .modes import warn_unconverged
from .particles import particle_values
from .posterior import laplace_gaussian
from .quadrature import quadrature_log_marginal, unit_disagreement

__all__ = ["PSISResult", "psis"]


class PSISResult:
    """The outcome of :func:`psis`.

    :ivar float k_hat: the Pareto shape of the weights' tail (see the module
        docstring for its thresholds; ``repr`` explains the value).
    :ivar float ess: effective sample size of the smoothed weights.
    :ivar float log_evidence: ``log mean(p / q)`` of the raw weights: an
        estimate of ``log p(z)`` (biased low; reliable when ``k̂`` is small).
    :ivar torch.Tensor log_weights: the smoothed, normalised log weights ``(S,)``.
    :ivar dict draws: the draws by site, constrained, leading dimension S.
    :ivar dict mean: the reweighted posterior means by site.
    :ivar dict sd: the reweighted posterior standard deviations by site.
    :ivar bool collapsed: whether the units were integrated out (then the
        draws, means and sds are of the global sites only).
    :ivar int num_nodes: quadrature nodes per dimension when collapsed.
    :ivar torch.Tensor flagged_units: when collapsed, the units whose log
        integral at θ̂ moves by more than 0.01 nat between ``num_nodes`` and
        ``num_nodes + 2`` nodes (their integrals are the least certain).
    """

    def __init__(self, log_weights, k_hat, log_evidence, draws, collapsed, num_nodes, flagged_units):
        self.log_weights, self.k_hat, self.log_evidence = log_weights, k_hat, log_evidence
        self.draws, self.collapsed = draws, collapsed
        self.num_nodes, self.flagged_units = num_nodes, flagged_units
        w = log_weights.exp()
        self.ess = float(1.0 / (w**2).sum())
        self.mean, self.sd = {}, {}
        for name, x in draws.items():
            weights = w.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)
            mean = (weights * x).sum(0)
            self.mean[name] = mean
            self.sd[name] = (weights * (x - mean) ** 2).sum(0).sqrt()

    def quantiles(self, quantiles: Sequence[float]) -> dict[str, torch.Tensor]:
        """Reweighted marginal quantiles by site, leading dimension ``len(quantiles)``."""
        q = torch.as_tensor(quantiles, dtype=torch.float64)
        if q.dim() != 1 or not ((q > 0) & (q < 1)).all():
            raise ValueError(f"quantiles must be a list of numbers in (0, 1), got {quantiles!r}")
        w = self.log_weights.exp().double()
        result = {}
        for name, x in self.draws.items():
            flat = x.reshape(x.shape[0], -1).double()
            order = flat.argsort(0)
            cumulative = w[order].cumsum(0)  # (S, m)
            index = torch.searchsorted(cumulative.T.contiguous(), q.expand(flat.shape[1], -1).contiguous())
            index = index.clamp(max=x.shape[0] - 1).T  # (len(q), m)
            values = flat.gather(0, order.gather(0, index))
            result[name] = values.reshape((len(q),) + x.shape[1:]).to(x.dtype)
        return result

    def verdict(self) -> str:
        if not math.isfinite(self.k_hat) or self.k_hat >= 0.7:
            return "unreliable (k̂ ≥ 0.7): the guide misses posterior mass; do not trust it or its reweighting"
        if self.k_hat >= 0.5:
            return "usable (0.5 ≤ k̂ < 0.7): the reweighted estimates converge slowly"
        return "good (k̂ < 0.5): the guide is close to the posterior and the reweighting reliable"

    def __repr__(self):
        kind = f"collapsed over the units, {self.num_nodes} nodes" if self.collapsed else "joint"
        flagged = "" if self.flagged_units is None else f", {self.flagged_units.numel()} units flagged"
        return (
            f"PSISResult(k_hat={self.k_hat:.3f}: {self.verdict()}; ess={self.ess:.1f} of "
            f"{self.log_weights.numel()} draws, {kind}{flagged})"
        )


def psis(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    quadrature: int | str | None = "auto",
    chunk_size: int = 100,
    **kwargs,
) -> PSISResult:
    """Pareto-smoothed importance sampling of ``guide`` against ``model``.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer.autoguide import AutoNormal

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("data", len(obs)):
                pyro.sample("z", dist.Normal(mu, 1.0), obs=obs)

        obs = torch.randn(20) + 2.0
        guide = AutoNormal(model)
        pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO()).step(obs)
        result = psis(model, guide, obs, num_samples=500)
        result.k_hat, result.mean["mu"], result.sd["mu"]   # reweighted toward the posterior

    :param model: the Pyro model.
    :param guide: any guide of it (set up by a call if it is an autoguide not
        yet run); must broadcast over a vectorized particle plate.
    :param int num_samples: draws S.
    :param quadrature: for a Laplace guide with a unit plate, the units'
        quadrature nodes per dimension (``"auto"``: chosen at θ̂ to 0.01 nat,
        then held); ``None`` weighs joint draws instead.
    :param int chunk_size: draws per vectorized evaluation (joint draws).
    :returns: a :class:`PSISResult`.
    """
    check_count("num_samples", num_samples, 2)
    check_count("chunk_size", chunk_size, 1)
    view = getattr(guide, "view", None)
    if view is None and hasattr(guide, "unit_plate"):
        guide(*args, **kwargs)  # set a Laplace guide up
        view = guide.view
    with torch.no_grad():
        if view is not None and view.num_units > 0 and quadrature is not None:
            log_w, draws, nodes, flagged = _collapsed(guide, view, args, kwargs, num_samples, quadrature)
        else:
            log_w, draws = _joint(model, guide, args, kwargs, num_samples, chunk_size)
            nodes, flagged = None, None
    smoothed, k_hat = _psis(log_w)
    log_evidence = float(torch.logsumexp(log_w, 0) - math.log(num_samples))
    return PSISResult(smoothed, k_hat, log_evidence, draws, nodes is not None, nodes, flagged)


def _psis(log_w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.23 announces its refactor
        import arviz as az
    if torch.isnan(log_w).any() or (log_w == math.inf).any():
        bad = int((torch.isnan(log_w) | (log_w == math.inf)).sum())
        raise ValueError(
            f"{bad} of {log_w.numel()} importance weights are NaN or infinite: log p or log q is "
            "undefined at those draws (check the model's density there)"
        )
    if (log_w == -math.inf).all():
        raise ValueError("every importance weight is zero: the guide's draws have no posterior density")
    log_w = log_w.clamp_min(torch.finfo(log_w.dtype).min)  # zero weights stay (nearly) zero
    smoothed, k_hat = az.psislw(log_w.detach().cpu().double().numpy())
    return torch.as_tensor(smoothed, dtype=log_w.dtype), float(k_hat)


def _collapsed(guide, view, args, kwargs, num_samples, quadrature):
    """Draws of θ from q(θ), weighed by the units' quadrature marginal."""
    view = view.with_args(*args, **kwargs)
    with torch.enable_grad():
        q = laplace_gaussian(poutine.trace(guide).get_trace(*args, **kwargs)).detach()
    if q.subsampled:
        raise ValueError("psis needs every unit at each draw: the guide's unit plate subsamples")
    theta_hat, y_hat = q.theta_hat, q.y_hat
    with torch.enable_grad():
        at_mode = quadrature_log_marginal(view, theta_hat, y_hat, num_nodes=quadrature, create_graph=False)
    nodes = at_mode.num_nodes
    flagged = unit_disagreement(view, theta_hat, at_mode.modes.y, nodes)
    marginal = q.marginal_global()
    thetas = marginal.sample((num_samples,))
    log_q = marginal.log_prob(thetas)
    log_p, y = [], at_mode.modes.y
    for theta in thetas:
        with torch.enable_grad():
            found = quadrature_log_marginal(view, theta, y, num_nodes=nodes, create_graph=False)
        warn_unconverged(found.modes)
        y = found.modes.y
        log_p.append(found.value.detach())
    log_w = torch.stack(log_p) - log_q
    draws = {
        s.name: s.transform(thetas[:, s.slice].reshape((num_samples,) + s.shape)) for s in view.global_layout
    }
    return log_w, draws, nodes, flagged


def _joint(model, guide, args, kwargs, num_samples, chunk_size):
    """Joint draws of every latent from the guide, weighed by p(x, z) / q(x)."""
    prototype = poutine.trace(guide).get_trace(*args, **kwargs)
    shapes = {
        name: site["value"].shape
        for name, site in prototype.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary") and not site["is_observed"]
    }
    log_w, draws, elbo = [], {name: [] for name in shapes}, None
    done = 0
    while done < num_samples:
        size = min(chunk_size, num_samples - done)
        if size == 1:
            size = 2 if num_samples - done > 1 else 1
        if elbo is None or elbo.num_particles != size:
            nesting = math.inf if elbo is None else elbo.max_plate_nesting - int(elbo.num_particles > 1)
            elbo = Trace_ELBO(num_particles=size, vectorize_particles=True, max_plate_nesting=nesting)
        with torch.enable_grad():
            values, trace = particle_values(elbo, model, guide, args, kwargs)
        log_w.append(values.detach())
        for name, shape in shapes.items():
            value = trace.nodes[name]["value"].detach()
            draws[name].append(value.reshape((size,) + shape) if size > 1 else value.reshape((1,) + shape))
        done += size
    return torch.cat(log_w), {name: torch.cat(v) for name, v in draws.items()}
