"""What a gradient estimator does: its variance, and the objective it differentiates.

:func:`gradient_variance` draws the gradient estimate of a loss many times
at the current parameters (nothing is updated) and reports, per parameter,
the mean, the variance and the signal-to-noise ratio |mean| / sd;
:func:`compare_gradient_variance` does it for several losses side by side.
:func:`surrogate_terms` shows the surrogate objective a loss runs
``backward()`` on, term by term, for one draw — so the effect of a
baseline, of Rao-Blackwellisation, of a control variate or of sticking the
landing can be read off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, JitTrace_ELBO, JitTraceGraph_ELBO, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.tracegraph_elbo import _construct_baseline

from .leave_one_out import tracegraph_terms
from .taylor_cv import trace_elbo_terms
from .tensor_ops import rng_state, set_rng_state


class ParameterStats(NamedTuple):
    """Gradient statistics of one parameter (flattened), over the draws."""

    mean: torch.Tensor
    variance: torch.Tensor

    @property
    def snr(self) -> torch.Tensor:
        """|mean| / sd per element (inf where the variance is zero)."""
        return self.mean.abs() / self.variance.sqrt()

    @property
    def total_variance(self) -> float:
        return float(self.variance.sum())


class GradientVariance(NamedTuple):
    """The result of :func:`gradient_variance`."""

    params: dict[str, ParameterStats]  # name -> ParameterStats
    num_draws: int
    seconds: float

    @property
    def total_variance(self) -> float:
        """Sum of the variances of every gradient element."""
        return sum(s.total_variance for s in self.params.values())

    def __str__(self):
        rows = [f"{'parameter':<32} {'|mean|':>11} {'variance':>11} {'SNR':>9}"]
        for name, s in self.params.items():
            snr = float(s.mean.norm() / s.variance.sum().sqrt()) if s.variance.sum() > 0 else math.inf
            rows.append(f"{name:<32} {float(s.mean.norm()):11.4g} {s.total_variance:11.4g} {snr:9.3g}")
        rows.append(f"{'total':<32} {'':>11} {self.total_variance:11.4g}")
        return "\n".join(rows)


def gradient_variance(
    model: Callable, guide: Callable, loss: ELBO, *args, num_draws: int = 100, seed: int = 0, **kwargs
) -> GradientVariance:
    """Mean, variance and signal-to-noise ratio of a loss's gradient estimate.

    The estimate is drawn ``num_draws`` times at the current parameters
    (each draw a fresh random seed, ``seed + i``), through the loss's own
    ``loss_and_grads`` (so it works for Pyro's ELBOs and curvi's alike).
    Nothing is changed: parameters, their ``.grad``, the guide's buffers
    (e.g. the warm-start caches of curvi's guides) and the random state are
    as they were. A baseline that keeps its state in the param store, such
    as Pyro's decaying average, does update it, and is reported as a
    parameter.

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.infer import Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from curvi import TaylorCV_ELBO, gradient_variance

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("data", len(obs)):
                pyro.sample("obs", dist.Normal(mu, 1.0), obs=obs)

        obs = torch.randn(20)
        guide = AutoNormal(model)
        plain = gradient_variance(model, guide, Trace_ELBO(), obs, num_draws=20)
        curved = gradient_variance(model, guide, TaylorCV_ELBO(), obs, num_draws=20)
        print(plain)             # a table: |mean|, variance, SNR per parameter
        curved.total_variance    # ~0: the control variate is exact for a Gaussian model
                                 # (and a guide whose entropy gradient is exact: not low-rank)

    :param model: the Pyro model.
    :param guide: the guide (its parameters are the ones reported).
    :param loss: an object with ``loss_and_grads(model, guide, *args, **kwargs)``.
    :param int num_draws: number of gradient draws (≥ 2).
    :param int seed: the first random seed.
    :returns: a :class:`GradientVariance`, ``params`` keyed by param-store name.
    """
    if not hasattr(loss, "loss_and_grads"):
        raise TypeError(f"loss must have loss_and_grads(), got {type(loss).__name__}")
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")

    rng = rng_state()
    store = pyro.get_param_store()
    saved_grads = {name: p.grad for name, p in store.named_parameters()}
    buffers = _snapshot_buffers(guide)
    draws = {}
    start = time.perf_counter()
    try:
        for i in range(num_draws):
            for _, p in store.named_parameters():
                p.grad = None
            pyro.set_rng_seed(seed + i)
            with poutine.trace(param_only=True) as capture:
                loss.loss_and_grads(model, guide, *args, **kwargs)
            for name, site in capture.trace.nodes.items():
                param = site["value"].unconstrained()
                grad = param.grad
                draws.setdefault(name, []).append(
                    torch.zeros_like(param).reshape(-1) if grad is None else grad.detach().reshape(-1).clone()
                )
    finally:
        for name, p in store.named_parameters():
            p.grad = saved_grads.get(name)
        _restore_buffers(guide, buffers)
        set_rng_state(rng)
    seconds = time.perf_counter() - start
    params = {}
    for name, values in draws.items():
        if len(values) != num_draws:
            continue  # a parameter that not every draw touched (e.g. a baseline created late)
        stack = torch.stack(values)
        params[name] = ParameterStats(stack.mean(0), stack.var(0))
    return GradientVariance(params, num_draws, seconds)


def compare_gradient_variance(
    model: Callable,
    guide: Callable,
    losses: dict[str, ELBO],
    *args,
    num_draws: int = 100,
    seed: int = 0,
    **kwargs,
) -> str:
    """A side-by-side table of the gradient variance of several losses at the
    guide's current parameters (the same seeds for each).

    :param dict losses: name -> loss object.
    :returns: a markdown table: total variance, its ratio to the first loss,
        and the median SNR over gradient elements, per loss.
    """
    results = {
        name: gradient_variance(model, guide, loss, *args, num_draws=num_draws, seed=seed, **kwargs)
        for name, loss in losses.items()
    }
    first = next(iter(results.values())).total_variance
    rows = [
        "| loss | total variance | variance reduction vs first | median SNR | s / draw |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        snr = torch.cat([s.snr for s in r.params.values()])
        ratio = first / r.total_variance if r.total_variance > 0 else math.inf
        rows.append(
            f"| {name} | {r.total_variance:.4g} | {ratio:.3g}× | {float(snr.nanmedian()):.3g} | "
            f"{r.seconds / r.num_draws:.3g} |"
        )
    return "\n".join(rows)


def surrogate_terms(loss: ELBO, model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    """The surrogate ELBO a loss differentiates, term by term, for one draw.

    Returns ``name -> tensor`` (still attached to the graph); ``backward()``
    runs on minus their sum (plus a baseline network's loss, shown as its own
    term). Works for curvi's losses (:class:`curvi.TaylorCV_ELBO`,
    :class:`curvi.LeaveOneOut_ELBO`) and Pyro's
    :class:`~pyro.infer.Trace_ELBO` and :class:`~pyro.infer.TraceGraph_ELBO`
    (with its baselines: decaying average, neural, user value).

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.distributions.testing.fakes import NonreparameterizedBeta
        from pyro.infer import TraceGraph_ELBO
        from curvi import LeaveOneOut_ELBO, surrogate_terms

        def model():
            f = pyro.sample("f", dist.Beta(10.0, 10.0))
            pyro.sample("obs", dist.Bernoulli(f), obs=torch.tensor(1.0))

        def guide():
            pyro.sample("f", NonreparameterizedBeta(torch.tensor(15.0), torch.tensor(15.0)))

        for loss in (TraceGraph_ELBO(), LeaveOneOut_ELBO(num_particles=4)):
            for name, term in surrogate_terms(loss, model, guide).items():
                print(f"{name:60s} {float(term):+.4f}")
    """
    if hasattr(loss, "surrogate_terms"):
        return loss.surrogate_terms(model, guide, *args, **kwargs)
    if type(loss) in (TraceGraph_ELBO, JitTraceGraph_ELBO):
        return _average(loss, model, guide, args, kwargs, _pyro_tracegraph_terms)
    if type(loss) in (Trace_ELBO, JitTrace_ELBO):
        return _average(loss, model, guide, args, kwargs, trace_elbo_terms)
    raise TypeError(
        "surrogate_terms knows Trace_ELBO, TraceGraph_ELBO (and their Jit forms) and curvi's losses; "
        f"got {type(loss).__name__}"
    )


def _average(loss, model, guide, args, kwargs, terms_fn):
    total = {}
    for model_trace, guide_trace in loss._get_traces(model, guide, args, kwargs):
        for name, term in terms_fn(model_trace, guide_trace).items():
            total[name] = total.get(name, 0.0) + term / loss.num_particles
    return total


def _pyro_tracegraph_terms(model_trace, guide_trace):
    def pyro_baseline(node, site, cost):
        use, baseline_loss, baseline = _construct_baseline(node, site, cost)
        options = site["infer"].get("baseline", {})
        label = "baseline (" + ", ".join(sorted(options)) + ")" if use else ""
        return label, baseline, baseline_loss

    terms, _ = tracegraph_terms(model_trace, guide_trace, pyro_baseline)
    return terms


def _snapshot_buffers(guide):
    if not isinstance(guide, torch.nn.Module):
        return {}
    return {name: b.clone() for name, b in guide.named_buffers()}


def _restore_buffers(guide, saved):
    if not saved:
        return
    buffers = dict(guide.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            if name in buffers and buffers[name].shape == value.shape:
                buffers[name].copy_(value)
