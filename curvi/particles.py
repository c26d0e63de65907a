"""Per-particle ELBOs: ``log p(x, z) − log q(x)`` for each of K vectorized
draws of a guide, the particle axis kept.

What sample-average Newton line-searches (:mod:`curvi.laplace_newton`) and
what importance sampling weighs (:mod:`curvi.psis`). For a Laplace guide
that sums hidden discrete sites out of its density, the model's are summed
out too (:class:`~curvi.hidden_sites.SummingOutELBO`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.trace_struct import Trace

from .checks import check_count
from .hidden_sites import SummingOutELBO, particle_log_joint

__all__ = ["particle_elbos", "particle_values"]


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
    reuse it so that max_plate_nesting is guessed once), and the guide trace."""
    preferred = guide.default_loss(*args, **kwargs) if hasattr(guide, "default_loss") else None
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
    for trace, sign in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            lp = site["log_prob"]
            if elbo.num_particles == 1:  # Pyro adds no particle plate for one particle
                total = total + sign * lp.sum()
                continue
            while lp.dim() < depth:
                lp = lp.unsqueeze(0)
            total = total + sign * lp.reshape(lp.shape[: lp.dim() - depth + 1] + (-1,)).sum(-1)
    values = torch.as_tensor(total).reshape(-1)
    K = elbo.num_particles
    return (values.expand(K) if values.numel() == 1 else values), guide_trace
