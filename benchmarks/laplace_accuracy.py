"""Benchmark: how close can a Laplace-based posterior of the globals get to NUTS?

The guides benchmark (``results/guides.md``) compares the globals' posterior
of curvi's guides with a long NUTS run on the hierarchical logistic model
(1 000 groups, 10 Bernoulli observations each). This script separates the
error of the *Laplace approximation over the units* from the error of the
guides, on the same data and the same NUTS reference:

* **Laplace marginal, Gaussian** -- TMB's posterior: a Gaussian in the
  unconstrained globals at the mode of the Laplace log marginal log p̃(θ, z),
  with covariance the inverse of its negative Hessian (no ELBO involved);
* **Laplace marginal, exact** -- the posterior ∝ exp log p̃(θ, z) itself,
  by self-normalised importance sampling from that Gaussian (its effective
  sample size is reported): what NUTS on :class:`curvi.LaplaceMarginal` would
  give, without its cost.

Both are read out in constrained space (sigma = exp of its coordinate) and
compared with NUTS as in the guides benchmark: |Δmean| / NUTS sd and
sd / NUTS sd per global.

Usage::

    python benchmarks/laplace_accuracy.py   # -> benchmarks/results/laplace_accuracy.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import simulate, torch_model  # noqa: E402

from curvi import ModelView, laplace_mode  # noqa: E402
from curvi.marginal import laplace_hessian, laplace_log_marginal  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "laplace_accuracy.md"
REFERENCE = HERE / "reference" / "nuts_1000.json"
GLOBALS = ["beta[0]", "beta[1]", "sigma[0]", "sigma[1]"]


def constrained(theta):
    return torch.cat([theta[..., :2], theta[..., 2:].exp()], -1)


def weighted_moments(values, log_w):
    w = torch.softmax(log_w, 0)
    mean = (w.unsqueeze(-1) * values).sum(0)
    var = (w.unsqueeze(-1) * (values - mean) ** 2).sum(0)
    ess = 1.0 / (w**2).sum()
    return mean, var.sqrt(), float(ess)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=4000, help="importance-sampling draws")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)

    ref = json.loads(REFERENCE.read_text())
    nuts_mean, nuts_sd = np.array(ref["mean"]), np.array(ref["sd"])
    x, y, *_ = simulate(1000, seed=0)
    view = ModelView(torch_model, torch.as_tensor(x), torch.as_tensor(y), unit_plate="groups")

    start = time.perf_counter()
    mode = laplace_mode(view, view.init_theta)
    theta, y_hat = mode.theta.detach(), mode.modes.y.detach()
    cov = torch.linalg.inv(-laplace_hessian(view, theta, y_hat))
    gaussian = torch.distributions.MultivariateNormal(theta, cov)
    mode_seconds = time.perf_counter() - start

    draws = gaussian.sample((args.draws,))
    start = time.perf_counter()
    log_target = []
    with torch.no_grad():
        for t in draws:
            value, _ = laplace_log_marginal(view, t, y_hat)
            log_target.append(value)
    is_seconds = time.perf_counter() - start
    log_w = torch.stack(log_target) - gaussian.log_prob(draws)

    rows = []
    ones = torch.zeros(args.draws)
    for name, lw in (
        ("Laplace marginal, Gaussian (TMB)", ones),
        ("Laplace marginal, exact (importance sampling)", log_w),
    ):
        mean, sd, ess = weighted_moments(constrained(draws), lw)
        dmean = np.abs(mean.numpy() - nuts_mean) / nuts_sd
        ratio = sd.numpy() / nuts_sd
        rows.append(
            f"| {name} | {ess:,.0f} | {dmean.max():.3f} | {ratio.min():.3f} – {ratio.max():.3f} | "
            + ", ".join(f"{v:.3f}" for v in dmean)
            + " | "
            + ", ".join(f"{v:.3f}" for v in ratio)
            + " |"
        )
    text = (
        "# Laplace-marginal posteriors of the globals against NUTS\n\n"
        f"Hierarchical logistic model, `simulate(1000, seed=0)` (as `results/guides.md`); float64. "
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}. Command: `python benchmarks/laplace_accuracy.py "
        f"{' '.join(sys.argv[1:])}`.\n\n"
        f"NUTS reference: `benchmarks/reference/nuts_1000.json` ({ref['chains']} chains × "
        f"{ref['samples']:,} draws). Mode and curvature of the Laplace marginal: {mode_seconds:.1f} s; "
        f"{args.draws:,} importance-sampling evaluations of log p̃: {is_seconds:.1f} s.\n\n"
        "| posterior | effective draws | max abs(Δmean) / NUTS sd | sd / NUTS sd (min – max) | "
        "abs(Δmean)/sd: " + ", ".join(GLOBALS) + " | sd ratio: " + ", ".join(GLOBALS) + " |\n"
        "|---|---:|---:|---:|---|---|\n" + "\n".join(rows) + "\n\n"
        "Reading: the Laplace approximation over each group's two latents (10 binary observations) "
        "shifts the random-effect sds by the amounts in the last row whatever is done with the "
        "globals afterwards, so no guide built on it -- curvi's Laplace guides included -- can be "
        "expected to match NUTS's means of the sds more closely than this.\n"
    )
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
