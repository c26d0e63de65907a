"""The curvature control variate and sticking the landing, as a Pyro loss.

For a reparameterised Gaussian guide q = N(μ(φ), Σ(φ)) over unconstrained
latents x, the ELBO gradient estimate of one particle x = x(φ, ε) is
∇_φ [log p(x) − log q(x; φ)]. Its noise comes mostly from log p. Let

    f̃(x) = log p(μ̄) + ḡᵀ(x − μ̄) + ½ (x − μ̄)ᵀ H̄ (x − μ̄)

be the second-order Taylor expansion of log p at the current mean μ̄ (ḡ, H̄
its gradient and Hessian there, held fixed). Its expectation under q is in
closed form, E_q f̃ = log p(μ̄) + ḡᵀ(μ − μ̄) + ½ (μ − μ̄)ᵀH̄(μ − μ̄) + ½ tr(H̄ Σ),
so

    ∇_φ [log p(x) − f̃(x)] + ∇_φ E_q f̃

has the same expectation as the plain estimate (any fixed ḡ, H̄ keep it
unbiased) and, where log p is close to quadratic over the bulk of q, far
less variance: it is exact, with zero variance, for a Gaussian model and a
guide whose reparameterised entropy gradient is itself exact (all supported
guides but the low-rank one, whose d + r noise variables leave it noisy)
(Miller et al., 2017, with the full Hessian in place of their diagonal).
Where log p is far from quadratic over the bulk of q it can add variance
instead (for the log-sds of weakly identified random effects, say; the
measurements are in ``benchmarks/results/estimators.md``). Measure with
:func:`curvi.gradient_variance` before relying on it.
H̄ enters only through products H̄(x − μ̄) and the trace, which curvi
computes from the plate-aware Hessian (p + k backward passes per step
whatever the number of units; :mod:`curvi.guide_moments`).

*Sticking the landing* (Roeder et al., 2017) drops the score term
∇_φ log q(x; φ)|ₓ of the entropy: zero in expectation, and the estimate is
exactly zero at the optimum when the guide family holds the posterior.

The two reach low variance by the same cancellation — the pathwise
derivative of log q(x; φ̄), −Σ⁻¹(x − μ), against the quadratic part of log p —
so they do not stack: with the control variate on, the entropy's score term
is what keeps the entropy's gradient exact, and dropping it brings back
noise of the size the control variate removed
(``benchmarks/results/estimators.md``). Use one or the other.

**References**

1. A. C. Miller, N. J. Foti, A. D'Amour, R. P. Adams, *Reducing
   Reparameterization Gradient Variance*, NeurIPS 2017.
2. G. Roeder, Y. Wu, D. Duvenaud, *Sticking the Landing: Simple,
   Lower-Variance Gradient Estimators for Variational Inference*, NeurIPS 2017.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import torch_backward, torch_item
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan

from .guide_moments import SUPPORTED, Curvature, FlatLayout, flat_log_density, gaussian_view, is_supported
from .guides import LaplaceGuideBase
from .model import ModelView


class TaylorCV_ELBO(Trace_ELBO):
    r"""Pyro's :class:`~pyro.infer.Trace_ELBO` with a curvature control
    variate and, optionally, sticking the landing, for Gaussian guides.

    The loss value is the ordinary ELBO estimate; only the gradient that
    ``backward()`` sees changes (see the module docstring). Each step
    computes the gradient and Hessian of log p once, at the guide's mean,
    for all particles.

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.infer import SVI
        from pyro.infer.autoguide import AutoNormal
        from curvi import TaylorCV_ELBO

        def model(x, obs):
            w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            with pyro.plate("data", len(obs)):
                pyro.sample("obs", dist.Bernoulli(logits=(w * x).sum(-1)), obs=obs)

        x, obs = torch.randn(50, 2), torch.randint(0, 2, (50,)).float()
        guide = AutoNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TaylorCV_ELBO(num_particles=4))
        for _ in range(5):
            svi.step(x, obs)

    :param int num_particles: particles per step (vectorised).
    :param str unit_plate: the plate of the unit-level latents, if any: the
        Hessian is then the block arrowhead of :func:`curvi.structured_hessian`
        (needed for curvi's Laplace guides; for Pyro's guides it makes the
        cost independent of the number of units). Without it the Hessian is
        dense, one backward pass per latent coordinate.
    :param bool control_variate: subtract the Taylor control variate.
    :param bool stick_the_landing: drop the score term of the entropy.
    :param kwargs: other options of :class:`~pyro.infer.Trace_ELBO`
        (``max_plate_nesting``, ...).
    :raises ValueError: for a guide that is not Gaussian (see
        :mod:`curvi.guide_moments`), a subsampled plate, or neither option on.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        unit_plate: str | None = None,
        control_variate: bool = True,
        stick_the_landing: bool = False,
        **kwargs,
    ):
        if not (control_variate or stick_the_landing):
            raise ValueError(
                "TaylorCV_ELBO with control_variate=False and stick_the_landing=False is "
                "pyro.infer.Trace_ELBO; turn one of them on"
            )
        if unit_plate is not None and not isinstance(unit_plate, str):
            raise ValueError(f"unit_plate must be a plate name or None, got {unit_plate!r}")
        kwargs.setdefault("vectorize_particles", True)
        super().__init__(num_particles=num_particles, **kwargs)
        self.unit_plate = unit_plate
        self.control_variate = control_variate
        self.stick_the_landing = stick_the_landing
        self._views = weakref.WeakKeyDictionary()  # guide -> (model, layout)

    # ----------------------------------------------------------- Pyro's API
    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        loss, surrogate = self._loss_and_surrogate(model, guide, args, kwargs)
        return loss + (surrogate - torch_item(surrogate))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss, surrogate = self._loss_and_surrogate(model, guide, args, kwargs)
        torch_backward(surrogate, retain_graph=self.retain_graph)
        return torch_item(loss)

    # ------------------------------------------------------------- the work
    def surrogate_terms(self, model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The surrogate ELBO of one step, term by term, averaged over the
        particles (``backward()`` runs on minus their sum); see
        :func:`curvi.surrogate_terms`."""
        terms = {}
        _check_guide(guide)
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for name, term in self._particle_terms(
                model, guide, model_trace, guide_trace, args, kwargs
            ).items():
                terms[name] = terms.get(name, 0.0) + term / self.num_particles
        return terms

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        loss, surrogate = 0.0, 0.0
        _check_guide(guide)
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            terms = self._particle_terms(model, guide, model_trace, guide_trace, args, kwargs)
            loss = loss - torch_item(elbo) / self.num_particles
            surrogate = surrogate - sum(terms.values()) / self.num_particles
        warn_if_nan(surrogate, "loss")
        return loss, surrogate

    def _particle_terms(self, model, guide, model_trace, guide_trace, args, kwargs):
        """Surrogate loss terms of one (possibly vectorised) trace pair."""
        _check_no_subsampling(model_trace)
        terms = trace_elbo_terms(model_trace, guide_trace)
        layout, log_density = self._layout(model, guide, args, kwargs)
        q = gaussian_view(guide, layout)
        if self.stick_the_landing:
            live = sum(guide_trace.nodes[n]["log_prob_sum"] for n in q.gaussian_sites(guide_trace))
            terms["sticking the landing: log q(x; φ) − log q(x; φ̄)"] = _zero_valued(
                live - q.log_q_detached(guide_trace)
            )
        if self.control_variate:
            x = q.particles(guide_trace)
            mean, cov = q.moments(guide_trace)
            H = Curvature.at(layout, mean, log_density)
            delta = (x - mean).detach()
            slope = H.grad + H.matvec(delta)  # ∇f̃ at each particle
            sample_term = (slope * x).sum()
            expectation = x.shape[0] * ((H.grad * mean).sum() + 0.5 * cov.trace_with(H))
            terms["control variate: K E_q f̃ − Σₖ f̃(xₖ)"] = _zero_valued(expectation - sample_term)
        return terms

    def _layout(self, model, guide, args, kwargs):
        """The flat layout (and, without a unit plate, the log density) of
        ``model`` called with ``args``."""
        if getattr(guide, "prototype_trace", None) is None:
            guide._setup_prototype(*args, **kwargs)
        if isinstance(guide, LaplaceGuideBase):
            if self.unit_plate not in (None, guide.unit_plate):
                raise ValueError(
                    f"unit_plate='{self.unit_plate}' but the guide's unit plate is '{guide.unit_plate}'"
                )
            view = guide.view.with_args(*args, **kwargs)
            return FlatLayout.from_view(view), None
        cached = self._views.get(guide)
        if cached is None or cached[0] is not model:
            if self.unit_plate is not None:
                view = ModelView(model, *args, unit_plate=self.unit_plate, **kwargs)
                cached = (model, FlatLayout.from_view(view))
            else:
                cached = (model, FlatLayout.from_trace(guide.prototype_trace))
            self._views[guide] = cached
        layout = cached[1]
        if layout.view is not None:
            return FlatLayout(layout.sites, view=layout.view.with_args(*args, **kwargs)), None
        return layout, flat_log_density(model, layout, args, kwargs)


def _check_guide(guide):
    """A clear error for guides the estimators cannot read, before anything runs."""
    if not is_supported(guide):
        raise ValueError(
            "the curvature control variate and sticking the landing need a Gaussian guide "
            f"({SUPPORTED}); got {getattr(type(guide), '__name__', guide)}"
        )


def _zero_valued(term):
    """``term`` with value zero and the same gradient."""
    return term - term.detach()


def _check_no_subsampling(trace):
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.size < frame.full_size:
                    raise ValueError(
                        f"TaylorCV_ELBO needs the full data: plate '{frame.name}' of site "
                        f"'{site['name']}' subsamples ({frame.size} of {frame.full_size})"
                    )


def trace_elbo_terms(model_trace: Trace, guide_trace: Trace) -> dict[str, torch.Tensor]:
    """The surrogate ELBO of :class:`~pyro.infer.Trace_ELBO` for one trace pair,
    by term: log p of each model site, the entropy term of each guide site,
    and score function × log p/q for non-reparameterised guide sites."""
    terms, log_r = {}, None
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            terms[f"log p({name})"] = site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        _, score, entropy = site["score_parts"]
        if not is_identically_zero(entropy):
            terms[f"-log q({name})"] = -entropy.sum()
        if not is_identically_zero(score):
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            terms[f"score({name}) × log p/q of the whole trace"] = (
                log_r.sum_to(site["cond_indep_stack"]) * score
            ).sum()
    return terms
