"""Part of ``benchmarks/natural.py``: the Bayesian learning rule
(``curvi.NaturalGradient``) against Pyro's Adam on logistic regression.

Full-covariance Gaussian guide (``AutoMultivariateNormal``), Normal(0, 5)
priors, float64:

* **Pima** -- the bundled real data (532 women, 7 standardised covariates +
  intercept, d = 8);
* **simulated** -- d = 50 (49 standard-normal covariates + intercept),
  n = 2 000, true weights N(0, 0.5²), seed 0.

Methods, each with 1 and 8 particles (draws per step; 8 in antithetic
pairs for the rule): Pyro's ``Trace_ELBO`` + ``Adam`` at each learning rate
of ``--adam-lrs``; ``NaturalGradient(curvature="hessian")`` (exact Hessians
of the draws) at each step size of ``--hessian-lrs``; and
``NaturalGradient(curvature="gradient")`` (the Bonnet–Price estimate from
the draws' gradients alone) at each of ``--gradient-lrs``; the rule as the
optimiser with its own loss, ``SVI(model, guide, optim, optim.loss)``. A
run stops after ``--max-iters`` iterations or ``--max-seconds`` of
training, or when a step fails (a ``diverged`` row).

The ELBO is evaluated, off the clock, at iterations 1–10 and then every
10 % more, always with the same ``--eval-particles`` standard-normal draws
(common random numbers). The *optimal ELBO* is the best such value of a
reference run (the rule with exact Hessians, ``--ref-samples`` antithetic
draws per step, step size 0.5, ``--ref-iters`` steps) or of any run, if
higher. Reported: iterations and training seconds to first reach within 1
and 0.1 nat of it, ms per iteration, and the ratio of the best Adam's
iterations to the best rule's.
"""

from __future__ import annotations

import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

from curvi import NaturalGradient
from curvi.datasets import load_pima


def logistic_model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 5.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=(w * X).sum(-1)), obs=y)


def pima():
    data = load_pima(dtype=torch.float64)
    return torch.cat([torch.ones(len(data.y), 1), data.X], 1), data.y


def simulated(d=50, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.ones(n, 1), torch.randn(n, d - 1, generator=g)], 1)
    w = 0.5 * torch.randn(d, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def eval_points(max_iters):
    points, i = list(range(1, 11)), 10
    while i < max_iters:
        i = max(i + 1, int(math.ceil(i * 1.1)))
        points.append(min(i, max_iters))
    return sorted(set(points))


class Evaluator:
    """ELBO with a fixed set of standard-normal draws (common random numbers)."""

    def __init__(self, X, y, particles, seed=123):
        self.X, self.y = X, y
        self.eps = torch.randn(particles, X.shape[1], generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def __call__(self, guide):
        q = guide.get_posterior()
        w = q.mean + self.eps @ q.scale_tril.T
        log_lik = torch.distributions.Bernoulli(logits=w @ self.X.T).log_prob(self.y).sum(-1)
        log_prior = dist.Normal(0.0, 5.0).log_prob(w).sum(-1)
        return float((log_lik + log_prior - q.log_prob(w)).mean())


METHODS = {"Adam": "adam-lrs", "NG hessian": "hessian-lrs", "NG gradient": "gradient-lrs"}


def train(method, lr, particles, X, y, evaluator, max_iters, max_seconds, seed=0):
    """``[(iteration, seconds, ELBO)]`` at the evaluation points, and the
    iteration at which a step failed (None if none did)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(logistic_model)
    guide(X, y)
    if method == "Adam":
        svi = SVI(
            logistic_model,
            guide,
            pyro.optim.Adam({"lr": lr}),
            Trace_ELBO(num_particles=particles, vectorize_particles=True),
        )
    else:
        curvature = method.split()[-1]
        optim = NaturalGradient(lr=lr, num_samples=particles, curvature=curvature)
        svi = SVI(logistic_model, guide, optim, optim.loss)
    trace, clock, checks = [], 0.0, set(eval_points(max_iters))
    for it in range(1, max_iters + 1):
        start = time.perf_counter()
        try:
            svi.step(X, y)
        except ValueError:  # the rule's precision broke down, or a non-finite loss
            return trace, it
        clock += time.perf_counter() - start
        if it in checks:
            value = evaluator(guide)
            if not math.isfinite(value):
                return trace, it
            trace.append((it, clock, value))
        if clock > max_seconds:
            break
    return trace, None


def first_within(trace, level):
    for it, clock, value in trace:
        if value >= level:
            return it, clock
    return None, None


def table(name, X, y, args):
    evaluator = Evaluator(X, y, args.eval_particles)
    start = time.perf_counter()
    ref, _ = train("NG hessian", 0.5, args.ref_samples, X, y, evaluator, args.ref_iters, math.inf)
    ref_seconds = time.perf_counter() - start
    runs = {}
    for particles in (1, 8):
        for method, option in METHODS.items():
            for lr in getattr(args, option.replace("-", "_")):
                runs[(method, lr, particles)] = train(
                    method, lr, particles, X, y, evaluator, args.max_iters, args.max_seconds
                )
                print(f"  {name} {method} lr={lr} K={particles} done", flush=True)
    optimum = max([v for _, _, v in ref] + [v for t, _ in runs.values() for _, _, v in t])

    def row_stats(trace):
        it1, t1 = first_within(trace, optimum - 1.0)
        it01, t01 = first_within(trace, optimum - 0.1)
        if not trace:
            return it1, t1, it01, t01, math.nan, -math.inf
        last_it, last_clock, last = trace[-1]
        return it1, t1, it01, t01, 1000 * last_clock / last_it, last

    def key(stats):  # best: fewest iterations to 1 nat, then to 0.1 nat, then final ELBO
        it1, _, it01, _, _, last = stats
        return (it1 is None, it1 or 0, it01 is None, it01 or 0, -last)

    lines = [
        f"### {name} (d = {X.shape[1]}, n = {X.shape[0]})\n",
        f"Optimal ELBO {optimum:.3f} (reference: the rule with exact Hessians, step 0.5, "
        f"{args.ref_samples} antithetic draws × {args.ref_iters} steps, {ref_seconds:.0f} s; evaluation with "
        f"{args.eval_particles} fixed draws).\n",
        "| method | lr | particles | iters to −1 nat | s to −1 nat | iters to −0.1 nat | s to −0.1 nat | "
        "ms / iter | final ELBO − optimal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = {}
    for (method, lr, particles), (trace, _) in runs.items():
        stats = row_stats(trace)
        if (method, particles) not in best or key(stats) < key(best[(method, particles)][1]):
            best[(method, particles)] = (lr, stats)
    fmt = lambda v, f: "never" if v is None else format(v, f)  # noqa: E731
    for (method, lr, particles), (trace, failed) in sorted(
        runs.items(), key=lambda kv: (kv[0][2], list(METHODS).index(kv[0][0]), kv[0][1])
    ):
        it1, t1, it01, t01, ms, last = row_stats(trace)
        mark = "**" if best[(method, particles)][0] == lr else ""
        final = f"diverged at iteration {failed}" if failed else f"{last - optimum:+.3f}"
        lines.append(
            f"| {mark}{method}{mark} | {lr:g} | {particles} | {fmt(it1, 'd')} | {fmt(t1, '.3f')} | "
            f"{fmt(it01, 'd')} | {fmt(t01, '.3f')} | {ms:.2f} | {final} |"
        )
    summary = []
    for particles in (1, 8):
        a_lr, a = best[("Adam", particles)]
        for method in ("NG hessian", "NG gradient"):
            b_lr, b = best[(method, particles)]
            if a[0] and b[0]:
                ratio, cost = a[0] / b[0], b[4] / a[4]
                summary.append(
                    f"- {name}, {particles} particle(s), {method}: to within 1 nat, best Adam (lr {a_lr:g}) "
                    f"{a[0]} iterations ({a[1]:.2f} s), the rule (lr {b_lr:g}) {b[0]} ({b[1]:.2f} s): "
                    f"**{ratio:.1f}× fewer** (target ≥ 20×: {'met' if ratio >= 20 else 'missed'}); cost per "
                    f"iteration {cost:.1f}× Adam's (target ≤ 2×: {'met' if cost <= 2 else 'missed'})."
                )
            else:
                summary.append(
                    f"- {name}, {particles} particle(s), {method}: a method never came within "
                    f"1 nat (Adam: {a[0]}, rule: {b[0]})."
                )
    return "\n".join(lines), summary


def run(args):
    """Markdown sections and target lines of the logistic part."""
    torch.set_default_dtype(torch.float64)
    sections, summary = [], []
    problems = [("Pima", pima())] + ([] if args.quick else [("Simulated", simulated())])
    for name, (X, y) in problems:
        print(f"{name} ...", flush=True)
        text, lines = table(name, X, y, args)
        sections.append(text)
        summary += lines
    return "\n\n".join(sections), summary
