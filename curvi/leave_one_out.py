"""A leave-one-out baseline for score-function gradients, as a Pyro loss.

For a guide site z that cannot be reparameterised, Pyro's
:class:`~pyro.infer.TraceGraph_ELBO` forms the score-function term
∇ log q(z) · (c − b): c the site's *downstream cost* (the log p − log q
terms that depend on z, found by provenance tracking: Rao-Blackwellisation)
and b a baseline, which keeps the estimate unbiased as long as it does not
depend on z itself. With K particles drawn together, the other particles
give such a baseline for free (Kool et al., 2019; Mnih & Rezende, 2016):

    bₖ = (1 / (K − 1)) Σ_{j ≠ k} c_j,

independent of particle k, with no state and nothing to tune.
:class:`LeaveOneOut_ELBO` is :class:`~pyro.infer.TraceGraph_ELBO` with
vectorised particles and that baseline at every non-reparameterised site;
reparameterised sites and the dependency tracking are Pyro's, unchanged.

**References**

1. W. Kool, H. van Hoof, M. Welling, *Buy 4 REINFORCE Samples, Get a
   Baseline for Free!*, ICLR workshop 2019.
2. A. Mnih, D. J. Rezende, *Variational Inference for Monte Carlo
   Objectives*, ICML 2016.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import TraceGraph_ELBO
from pyro.infer.util import MultiFrameTensor
from pyro.ops.provenance import detach_provenance, get_provenance
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace

PARTICLE_PLATE = "num_particles_vectorized"


class LeaveOneOut_ELBO(TraceGraph_ELBO):
    r""":class:`~pyro.infer.TraceGraph_ELBO` with a leave-one-out baseline
    over ``num_particles`` vectorised particles.

    Each particle's baseline at a non-reparameterised site is the mean
    downstream cost of the other particles at that site; the estimate stays
    unbiased, composes with Pyro's provenance-based Rao-Blackwellisation, and
    needs no baseline state. Sites must not ask for a Pyro baseline of their
    own (``infer={"baseline": ...}``).

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.distributions.testing.fakes import NonreparameterizedBeta
        from pyro.infer import SVI
        from curvi import LeaveOneOut_ELBO

        def model(flips):
            f = pyro.sample("f", dist.Beta(10.0, 10.0))
            with pyro.plate("flips", len(flips)):
                pyro.sample("obs", dist.Bernoulli(f), obs=flips)

        def guide(flips):
            a = pyro.param("a", torch.tensor(15.0), constraint=dist.constraints.positive)
            b = pyro.param("b", torch.tensor(15.0), constraint=dist.constraints.positive)
            pyro.sample("f", NonreparameterizedBeta(a, b))

        flips = torch.tensor([1.0] * 6 + [0.0] * 4)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), LeaveOneOut_ELBO(num_particles=8))
        for _ in range(5):
            svi.step(flips)

    :param int num_particles: K ≥ 2 particles per step, drawn together.
    :param kwargs: other options of :class:`~pyro.infer.TraceGraph_ELBO`
        (``max_plate_nesting``, ...).
    """

    def __init__(self, num_particles: int = 2, **kwargs):
        if not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(f"a leave-one-out baseline needs num_particles >= 2, got {num_particles!r}")
        if kwargs.pop("vectorize_particles", True) is not True:
            raise ValueError(
                "LeaveOneOut_ELBO draws its particles together: vectorize_particles must be True"
            )
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """Minus the ELBO estimate, with the gradient of the surrogate."""
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + (surrogate_loss - surrogate_loss.detach())

    def _loss_and_surrogate_loss_particle(self, model_trace, guide_trace):
        terms, elbo = tracegraph_terms(model_trace, guide_trace, self._baseline)
        return elbo, -sum(terms.values())

    def surrogate_terms(self, model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The surrogate ELBO of one step, term by term, averaged over the
        particles (``backward()`` runs on minus their sum); see
        :func:`curvi.surrogate_terms`."""
        ((model_trace, guide_trace),) = self._get_traces(model, guide, args, kwargs)
        terms, _ = tracegraph_terms(model_trace, guide_trace, self._baseline)
        return {name: term / self.num_particles for name, term in terms.items()}

    def _baseline(self, node, site, cost):
        if site["infer"].get("baseline"):
            raise ValueError(
                f"site '{node}' asks for a Pyro baseline {sorted(site['infer']['baseline'])}; "
                "LeaveOneOut_ELBO provides its own"
            )
        return "leave-one-out baseline", _leave_one_out(cost, site, self.num_particles), 0.0


def tracegraph_terms(
    model_trace: Trace,
    guide_trace: Trace,
    baseline_fn: Callable[
        [str, Message, torch.Tensor], tuple[str, torch.Tensor | float, torch.Tensor | float]
    ],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The surrogate ELBO of :class:`~pyro.infer.TraceGraph_ELBO` for one trace
    pair, by term, and the ELBO: ``log p`` of each model site, the entropy
    term of each reparameterised guide site, and for each non-reparameterised
    guide site its score function times its downstream cost (found by
    provenance) less a baseline. ``baseline_fn(node, site, cost)`` returns
    ``(label, baseline, baseline_loss)``.
    """
    elbo = 0.0
    terms = {}
    downstream_costs = defaultdict(MultiFrameTensor)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"]
            terms[f"log p({name})"] = site["log_prob_sum"]
            for key in get_provenance(site["log_prob_sum"]):
                downstream_costs[key].add((site["cond_indep_stack"], site["log_prob"]))
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            elbo = elbo - site["log_prob_sum"]
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                terms[f"-log q({name})"] = -entropy_term.sum()
            for key in get_provenance(site["log_prob_sum"]):
                downstream_costs[key].add((site["cond_indep_stack"], -site["log_prob"]))

    for node, cost in downstream_costs.items():
        site = guide_trace.nodes[node]
        cost = cost.sum_to(site["cond_indep_stack"])
        label, baseline, baseline_loss = baseline_fn(node, site, cost)
        score = site["score_parts"].score_function
        name = f"score({node}) × (downstream cost − {label})" if label else f"score({node}) × downstream cost"
        terms[name] = (score * (cost - baseline).detach()).sum()
        if not is_identically_zero(baseline_loss):
            terms[f"-baseline loss({node})"] = -baseline_loss
    terms = {name: detach_provenance(t) for name, t in terms.items()}
    return terms, detach_provenance(elbo)


def _leave_one_out(cost, site, num_particles):
    """The mean of the other particles' costs, at each particle."""
    frame = next((f for f in site["cond_indep_stack"] if f.name == PARTICLE_PLATE), None)
    if frame is None:
        raise ValueError(f"site '{site['name']}' is outside the particle plate")
    dim = frame.dim
    if cost.dim() < -dim or cost.shape[dim] == 1:
        return cost  # the same cost for every particle: its score term has mean zero
    total = cost.sum(dim, keepdim=True)
    return (total - cost) / (num_particles - 1)
