"""Per-particle ELBOs: ``log p(x, z) − log q(x)`` for each of K vectorized
draws of a guide, the particle axis kept.

What sample-average Newton line-searches (:mod:`curvi.laplace_newton`) and
what importance sampling weighs (:mod:`curvi.psis`). For a Laplace guide
that sums hidden discrete sites out of its density, the model's are summed
out too (:class:`~curvi.hidden_sites.SummingOutELBO`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.trace_struct import Trace

from . import distributed
from .checks import check_count
from .hidden_sites import SummingOutELBO, particle_log_joint
from .modes import warn_unconverged
from .posterior import INFER_KEY
from .quadrature import quadrature_log_marginal

__all__ = ["CollapsedELBO", "particle_elbos", "particle_values"]


def particle_elbos(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 2,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """The ELBO of each of ``num_particles`` vectorized particles, ``(K,)``,
    differentiable: ``log p(x, z) − log q(x)`` summed over sites, the
    particle axis kept. Their mean is ``−Trace_ELBO(num_particles=K,
    vectorize_particles=True).differentiable_loss``.

    Usage::

        import pyro, pyro.distributions as dist

        def model():
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

        def guide():
            pass

        particle_elbos(model, guide, num_particles=4)  # four times log N(0.5; 0, 1)

    :param int max_plate_nesting: as in :class:`~pyro.infer.Trace_ELBO`
        (default: guessed by running model and guide once more).
    """
    check_count("num_particles", num_particles, 1)
    elbo = Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=True,
        max_plate_nesting=math.inf if max_plate_nesting is None else max_plate_nesting,
    )
    return particle_values(elbo, model, guide, args, kwargs)[0]


def particle_values(
    elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, Trace]:
    """Per-particle ELBOs from one vectorized trace of ``elbo`` (a Trace_ELBO;
    reuse it so that max_plate_nesting is guessed once), and the guide trace.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer.autoguide import AutoNormal

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(mu, 1.0), obs=torch.tensor(0.5))

        guide = AutoNormal(model)
        elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=0)
        values, guide_trace = particle_values(elbo, model, guide, (), {})   # values: (5,)
    """
    # a Laplace guide's default_loss sets it up (so that collapsed_nodes is known on the first call)
    preferred = guide.default_loss(*args, **kwargs) if hasattr(guide, "default_loss") else None
    if getattr(guide, "collapsed_nodes", None) is not None:
        return _collapsed_values(elbo, guide, args, kwargs)
    total, traces = 0.0, ()
    if isinstance(preferred, SummingOutELBO):
        # sites the guide sums out: the model's log p with them summed out, per particle
        if math.isinf(elbo.max_plate_nesting):
            elbo.max_plate_nesting = preferred.max_plate_nesting + int(elbo.num_particles > 1)
        summing = SummingOutELBO(
            preferred.hidden,
            num_particles=elbo.num_particles,
            vectorize_particles=True,
            max_plate_nesting=elbo.max_plate_nesting - int(elbo.num_particles > 1),  # Pyro adds it
        )
        model_trace, guide_trace = next(iter(summing._get_traces(model, guide, args, kwargs)))
        plate = "num_particles_vectorized" if elbo.num_particles > 1 else None
        total = particle_log_joint(model_trace, plate)
        traces = ((guide_trace, -1.0),)
    else:
        model_trace, guide_trace = next(iter(elbo._get_traces(model, guide, args, kwargs)))
        traces = ((model_trace, 1.0), (guide_trace, -1.0))
    depth = elbo.max_plate_nesting  # (guessed by now) the particle plate is the leftmost of these dims
    share = _replicated_share(guide)
    for trace, sign in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            lp = site["log_prob"]
            if share is not None and share(site):
                lp = lp * distributed.replicated_weight()
            if elbo.num_particles == 1:  # Pyro adds no particle plate for one particle
                total = total + sign * lp.sum()
                continue
            while lp.dim() < depth:
                lp = lp.unsqueeze(0)
            total = total + sign * lp.reshape(lp.shape[: lp.dim() - depth + 1] + (-1,)).sum(-1)
    values = torch.as_tensor(total).reshape(-1)
    K = elbo.num_particles
    return (values.expand(K) if values.numel() == 1 else values), guide_trace


def _replicated_share(guide):
    """When the units are shared among processes: a test of whether a site's
    density is computed alike on every process (a latent outside the unit
    plate: θ's prior, q(θ) and its Delta sites), whose share is 1/K; None
    otherwise. Observed sites and factors hold the process's own data."""
    if not distributed.is_sharded():
        return None
    plate = getattr(guide, "unit_plate", None)
    if not isinstance(plate, str):
        raise ValueError(
            "under torch.distributed curvi's ELBO needs a guide with one unit plate "
            f"(AmortizedLaplaceGuide or LaplaceGuide with unit_plate=...), got {type(guide).__name__}"
        )

    def replicated(site):
        in_plate = any(f.name == plate for f in site["cond_indep_stack"])
        return not site["is_observed"] and not in_plate

    return replicated


def _collapsed_values(elbo, guide, args, kwargs):
    """Per-particle *collapsed* ELBOs of a Laplace guide with quadrature:
    ``log p̂_K(z, θₖ) − log q(θₖ)`` for K draws of θ from the guide's q(θ),
    the units integrated out by adaptive quadrature
    (:func:`~curvi.quadrature.quadrature_log_marginal`, differentiable
    through the modes and their curvature); the guide's draws of the units
    are not used."""
    if math.isinf(elbo.max_plate_nesting):
        elbo.max_plate_nesting = guide.view.max_plate_nesting + int(elbo.num_particles > 1)
    with getattr(guide, "without_unit_draws", contextlib.nullcontext)():  # units unused here
        guide_trace = poutine.trace(elbo._vectorized_num_particles(guide)).get_trace(*args, **kwargs)
    (site,) = [s for s in guide_trace.nodes.values() if s["type"] == "sample" and INFER_KEY in s["infer"]]
    q = site["infer"][INFER_KEY]
    if q.subsampled:
        raise ValueError(
            "the collapsed ELBO integrates every unit: the guide's unit plate must not subsample"
        )
    p = q.theta_hat.shape[0]
    thetas = site["value"].reshape(-1, p)
    log_q = site["fn"].log_prob(site["value"]).reshape(-1)
    view = guide.view.with_args(*args, **kwargs)
    y, values = q.y_hat.detach(), []
    joint = getattr(guide, "collapsed_log_marginal", None)  # several grouping factors
    for theta in thetas:
        if joint is not None:
            value, modes = joint(view, theta, y, create_graph=torch.is_grad_enabled())
        else:
            found = quadrature_log_marginal(
                view, theta, y, num_nodes=guide.collapsed_nodes, create_graph=torch.is_grad_enabled()
            )
            value, modes = found.value, found.modes
        warn_unconverged(modes)
        y = modes.y
        values.append(value)
    # each process's share: its units' log marginals, and 1/K of log q(θ)
    return torch.stack(values) - distributed.replicated_weight() * log_q, guide_trace


class CollapsedELBO(Trace_ELBO):
    """The ELBO of q(θ) with the units integrated out by quadrature,
    ``E_q(θ)[log p̂_K(z, θ)] + H[q(θ)]``, for an
    :class:`~curvi.guides.AmortizedLaplaceGuide` made with ``quadrature=``:
    a loss for ``SVI`` (what :func:`curvi.fit` uses with such a guide when
    the optimiser brings no loss of its own). ``K`` vectorized draws of θ.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import AmortizedLaplaceGuide

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

        obs = torch.bernoulli(torch.full((10, 3), 0.3))
        guide = AmortizedLaplaceGuide(model, unit_plate="groups", quadrature=5)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), CollapsedELBO(num_particles=4))
        svi.step(obs)                        # −(collapsed ELBO estimate)

    :param int num_particles: draws of θ per estimate.
    """

    def __init__(self, num_particles: int = 8, **kwargs):
        check_count("num_particles", num_particles, 1)
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if hasattr(guide, "default_loss"):
            guide.default_loss(*args, **kwargs)  # sets a fresh guide up
        if getattr(guide, "collapsed_nodes", None) is None:
            raise ValueError(
                "CollapsedELBO needs an AmortizedLaplaceGuide made with quadrature= (its "
                "units are integrated by the guide's quadrature rule)"
            )
        values, _ = particle_values(self, model, guide, args, kwargs)
        return -values.mean()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
