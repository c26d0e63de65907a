"""Benchmark: gradient estimators -- baselines for score-function gradients,
and the curvature control variate / sticking the landing for Gaussian guides.

1. **Coin** (Pyro's SVI tutorial, part III): prior Beta(10, 10), six heads in
   ten flips, a non-reparameterised Beta guide starting at Beta(15, 15), Adam
   with lr 0.0005 (betas 0.90, 0.999); a run has converged at the first step
   where both guide parameters are within 0.8 of the exact posterior's
   (16, 14). Steps to converge over ``--seeds`` seeds (median and quartiles;
   a run that has not converged by ``--max-steps`` counts as that many) for
   Pyro's ``TraceGraph_ELBO`` with no baseline and with its decaying-average
   baseline (β = 0.90), and curvi's ``LeaveOneOut_ELBO``; the Pyro estimators
   with one particle (as in the tutorial) and with the same K particles as
   the leave-one-out baseline.
2. **Gradient variance** at the start, mid-way and at the optimum of a fit,
   for Pyro's ``Trace_ELBO`` (standard), sticking the landing (STL), the
   curvature control variate (CV) and CV + STL, one particle each:
   (a) logistic regression on the bundled Pima data (532 women, 7
   standardised covariates + intercept) with Pyro's
   ``AutoMultivariateNormal``; (b) the hierarchical logistic model of
   ``benchmarks/common.py`` (1 000 groups, random intercept and slope) with
   ``AmortizedLaplaceGuide``. The optimum is a long Adam run with the CV + STL
   loss; "start" is the guide's initial point (for (b) with
   ``init_to_mode=False``); "mid-way" is the midpoint of the two in the
   guide's unconstrained parameters. Variance: the sum over every gradient
   element of its variance over ``--draws`` independent draws.

Usage::

    python benchmarks/estimators.py            # -> benchmarks/results/estimators.md
    python benchmarks/estimators.py --quick    # fewer seeds and draws, printed only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.testing.fakes import NonreparameterizedBeta
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import simulate, torch_model  # noqa: E402

from curvi import AmortizedLaplaceGuide, LeaveOneOut_ELBO, TaylorCV_ELBO, gradient_variance  # noqa: E402
from curvi.datasets import load_pima  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "estimators.md"
EXACT = (16.0, 14.0)


# ----------------------------------------------------------------------- coin
def coin_model(flips):
    f = pyro.sample("f", dist.Beta(10.0, 10.0))
    with pyro.plate("flips", len(flips)):
        pyro.sample("obs", dist.Bernoulli(f), obs=flips)


def make_coin_guide(decaying_baseline):
    infer = (
        {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.90}} if decaying_baseline else {}
    )

    def guide(flips):
        a = pyro.param("alpha_q", torch.tensor(15.0), constraint=dist.constraints.positive)
        b = pyro.param("beta_q", torch.tensor(15.0), constraint=dist.constraints.positive)
        pyro.sample("f", NonreparameterizedBeta(a, b), infer=infer)

    return guide


def coin_steps(loss, decaying_baseline, seed, max_steps):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    flips = torch.tensor([1.0] * 6 + [0.0] * 4)
    guide = make_coin_guide(decaying_baseline)
    svi = SVI(coin_model, guide, pyro.optim.Adam({"lr": 0.0005, "betas": (0.90, 0.999)}), loss)
    for step in range(1, max_steps + 1):
        svi.step(flips)
        a, b = pyro.param("alpha_q").item(), pyro.param("beta_q").item()
        if abs(a - EXACT[0]) < 0.8 and abs(b - EXACT[1]) < 0.8:
            return step
    return max_steps


def coin_table(args):
    K = args.particles
    runs = [
        ("TraceGraph_ELBO, no baseline", 1, lambda: TraceGraph_ELBO(max_plate_nesting=1), False),
        ("TraceGraph_ELBO, decaying-average baseline", 1, lambda: TraceGraph_ELBO(max_plate_nesting=1), True),
        (
            "TraceGraph_ELBO, no baseline",
            K,
            lambda: TraceGraph_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=1),
            False,
        ),
        (
            "TraceGraph_ELBO, decaying-average baseline",
            K,
            lambda: TraceGraph_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=1),
            True,
        ),
        (
            "**LeaveOneOut_ELBO** (curvi)",
            K,
            lambda: LeaveOneOut_ELBO(num_particles=K, max_plate_nesting=1),
            False,
        ),
    ]
    rows = [
        "| estimator | particles K | steps: median | quartiles | not converged | ms / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for name, k, make_loss, decaying in runs:
        steps, start = [], time.perf_counter()
        for seed in range(args.seeds):
            steps.append(coin_steps(make_loss(), decaying, seed, args.max_steps))
        seconds = time.perf_counter() - start
        q1, q2, q3 = statistics.quantiles(steps, n=4) if len(steps) > 1 else (steps[0],) * 3
        failed = sum(s >= args.max_steps for s in steps)
        ms = 1000 * seconds / sum(steps)
        medians[(name, k)] = statistics.median(steps)
        rows.append(
            f"| {name} | {k} | {statistics.median(steps):.0f} | {q1:.0f} – {q3:.0f} | {failed} | {ms:.2f} |"
        )
        print(rows[-1], flush=True)
    loo = medians[("**LeaveOneOut_ELBO** (curvi)", K)]
    decaying = {k: medians[("TraceGraph_ELBO, decaying-average baseline", k)] for k in (1, K)}
    verdict = (
        f"Leave-one-out median {loo:.0f} steps against the decaying-average baseline's "
        f"{decaying[K]:.0f} with the same {K} particles and {decaying[1]:.0f} with one: "
        + ("**target met**" if loo < min(decaying.values()) else "**target missed**")
        + " (fewer steps than the decaying-average baseline)."
    )
    return "\n".join(rows), verdict


# ---------------------------------------------------------- gradient variance
LOSSES = {
    "standard (Trace_ELBO)": lambda plate: Trace_ELBO(),
    "STL": lambda plate: TaylorCV_ELBO(unit_plate=plate, control_variate=False, stick_the_landing=True),
    "CV": lambda plate: TaylorCV_ELBO(unit_plate=plate),
    "CV + STL": lambda plate: TaylorCV_ELBO(unit_plate=plate, stick_the_landing=True),
}


def pima_problem():
    data = load_pima(dtype=torch.float64)
    X = torch.cat([torch.ones(len(data.y), 1, dtype=torch.float64), data.X], 1)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 5.0).expand([X.shape[1]]).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=(w * X).sum(-1)), obs=y)

    return model, (X, data.y), None, lambda: AutoMultivariateNormal(model)


def hierarchical_problem(num_groups):
    x, y, *_ = simulate(num_groups, seed=0)
    args = (torch.as_tensor(x), torch.as_tensor(y))
    return (
        torch_model,
        args,
        "groups",
        lambda: AmortizedLaplaceGuide(torch_model, unit_plate="groups", init_to_mode=False),
    )


def points(model, args, make_guide, fit_steps, lr):
    """Unconstrained parameter values at the start, mid-way and the optimum."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = make_guide()
    guide(*args)
    start = {n: p.detach().clone() for n, p in guide.named_parameters()}
    plate = getattr(guide, "unit_plate", None)
    svi = SVI(
        model,
        guide,
        pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / fit_steps)}),
        TaylorCV_ELBO(num_particles=8, unit_plate=plate, stick_the_landing=True),
    )
    t0 = time.perf_counter()
    for _ in range(fit_steps):
        svi.step(*args)
    fit_seconds = time.perf_counter() - t0
    optimum = {n: p.detach().clone() for n, p in guide.named_parameters()}
    mid = {n: 0.5 * (start[n] + optimum[n]) for n in start}
    return guide, {"start": start, "mid-way": mid, "optimum": optimum}, fit_seconds


def variance_table(title, problem, args):
    model, data, plate, make_guide = problem
    steps = args.fit_steps
    guide, where, fit_seconds = points(model, data, make_guide, steps, args.fit_lr)
    rows = [
        f"#### {title}\n",
        f"Optimum: {steps} steps of ClippedAdam (lr {args.fit_lr}, decaying ×0.1) with CV + STL, "
        f"8 particles ({fit_seconds:.1f} s). {args.draws} draws per cell.\n",
        "| point | loss | total variance | reduction vs standard | ELBO estimate | ms / draw |",
        "|---|---|---:|---:|---:|---:|",
    ]
    reductions = {}
    for point, values in where.items():
        with torch.no_grad():
            for n, p in guide.named_parameters():
                p.copy_(values[n])
        elbo = -Trace_ELBO(num_particles=200, vectorize_particles=True).loss(model, guide, *data)
        base = None
        for name, make_loss in LOSSES.items():
            r = gradient_variance(model, guide, make_loss(plate), *data, num_draws=args.draws, seed=1)
            base = r.total_variance if base is None else base
            ratio = base / r.total_variance if r.total_variance > 0 else float("inf")
            reductions[(point, name)] = ratio
            rows.append(
                f"| {point} | {name} | {r.total_variance:.4g} | {ratio:.3g}× | {elbo:.2f} | "
                f"{1000 * r.seconds / r.num_draws:.1f} |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows), reductions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, draws and steps; printed only")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--particles", type=int, default=4, help="K of the leave-one-out baseline")
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--fit-steps", type=int, default=1500)
    parser.add_argument("--fit-lr", type=float, default=0.05)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.max_steps, args.draws, args.fit_steps, args.groups = 4, 2000, 30, 300, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)

    print("coin ...", flush=True)
    coin, coin_verdict = coin_table(args)
    print("Pima logistic regression ...", flush=True)
    pima, pima_red = variance_table(
        "(a) Logistic regression, Pima data, AutoMultivariateNormal", pima_problem(), args
    )
    print("hierarchical logistic ...", flush=True)
    hier, hier_red = variance_table(
        f"(b) Hierarchical logistic, {args.groups:,} groups, AmortizedLaplaceGuide",
        hierarchical_problem(args.groups),
        args,
    )
    cv = pima_red[("optimum", "CV")]
    text = (
        "# Gradient estimators\n\n"
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}; {datetime.date.today().isoformat()}; "
        f"torch threads {torch.get_num_threads()}. Command: "
        f"`python benchmarks/estimators.py {' '.join(sys.argv[1:])}`.\n\n"
        "## 1. Coin: steps to converge with a non-reparameterised Beta guide\n\n"
        f"{args.seeds} seeds; cap {args.max_steps} steps. See the script's docstring for the set-up.\n\n"
        f"{coin}\n\n{coin_verdict}\n\n"
        "## 2. Gradient variance: standard, STL, control variate (CV), CV + STL\n\n"
        f"{pima}\n\n{hier}\n\n"
        "### Targets\n\n"
        f"- Near the optimum, the curvature control variate cuts gradient variance {cv:.3g}× against "
        f"Pyro's Trace_ELBO on logistic regression (target ≥ 50×: "
        + ("**met**" if cv >= 50 else "**missed**")
        + ").\n"
        f"- {coin_verdict}\n"
    )
    print("\n" + text)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
