"""Benchmark: Laplace maximum likelihood against glmmTMB and lme4's glmer.

Model: logistic regression with a correlated random intercept and slope per
group, ``y ~ x + (x | group)``, 10 observations per group, simulated with
intercept -0.5, slope 0.8, sds (1.0, 0.5) and correlation 0.4. curvi's
``laplace_mle`` (float64) runs in this process; glmmTMB and glmer run on the
same data through ``Rscript``, each fit timed inside R (library loading and
data reading excluded; glmmTMB's time includes its standard errors, as
curvi's does; curvi's imports are likewise warmed up by a tiny fit first).
R peers are skipped with a message when ``Rscript`` or the packages are
missing (``apt-get install r-cran-glmmtmb r-cran-lme4``).

Usage::

    python benchmarks/marginal.py            # 1 000 and 10 000 groups -> results/marginal.md
    python benchmarks/marginal.py --quick    # 200 groups, printed only
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

SIZES = [1000, 10_000]
OBS_PER_GROUP = 10
RESULTS = Path(__file__).parent / "results" / "marginal.md"
TRUTH = {"intercept": -0.5, "slope": 0.8, "sd": (1.0, 0.5), "corr": 0.4}

R_SCRIPT = r"""
suppressMessages({library(glmmTMB); library(lme4)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); d$group <- factor(d$group)
report <- function(name, seconds, ll, fe, sds, corr) {
  cat(sprintf("%s seconds=%.6f loglik=%.8f b0=%.8f b1=%.8f sd0=%.8f sd1=%.8f corr=%.8f\n",
              name, seconds, ll, fe[1], fe[2], sds[1], sds[2], corr))
}
if (args[2] %in% c("both", "glmmTMB")) {
  t0 <- Sys.time()
  m <- glmmTMB(y ~ x + (x | group), data = d, family = binomial)
  s <- summary(m)  # standard errors, as curvi computes them
  t1 <- Sys.time()
  vc <- VarCorr(m)$cond$group
  report("glmmTMB", as.numeric(t1 - t0, units = "secs"), as.numeric(logLik(m)),
         fixef(m)$cond, attr(vc, "stddev"), attr(vc, "correlation")[1, 2])
}
if (args[2] %in% c("both", "glmer")) {
  t0 <- Sys.time()
  g <- glmer(y ~ x + (x | group), data = d, family = binomial)
  s <- summary(g)
  t1 <- Sys.time()
  vc <- VarCorr(g)$group
  report("glmer", as.numeric(t1 - t0, units = "secs"), as.numeric(logLik(g)),
         fixef(g), attr(vc, "stddev"), attr(vc, "correlation")[1, 2])
}
"""


def simulate(num_groups, seed=0):
    rng = np.random.default_rng(seed)
    sd, rho = np.array(TRUTH["sd"]), TRUTH["corr"]
    chol = np.diag(sd) @ np.array([[1.0, 0.0], [rho, np.sqrt(1 - rho**2)]])
    u = rng.normal(size=(num_groups, 2)) @ chol.T
    x = rng.normal(size=(num_groups, OBS_PER_GROUP))
    eta = TRUTH["intercept"] + u[:, :1] + (TRUTH["slope"] + u[:, 1:]) * x
    y = (rng.uniform(size=eta.shape) < 1 / (1 + np.exp(-eta))).astype(np.float64)
    return x, y


def ml_model(x, y):
    """``y ~ x + (x | group)`` with the parameters as ``pyro.param`` sites."""
    beta = pyro.param("beta", torch.zeros(2, dtype=x.dtype))
    sd = pyro.param("sd", torch.ones(2, dtype=x.dtype), constraint=constraints.positive)
    L = pyro.param("L", torch.eye(2, dtype=x.dtype), constraint=constraints.corr_cholesky)
    with pyro.plate("groups", x.shape[0], dim=-2):
        u = pyro.sample("u", dist.MultivariateNormal(x.new_zeros(2), scale_tril=sd.unsqueeze(-1) * L))
        eta = beta[0] + u[..., 0] + (beta[1] + u[..., 1]) * x
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=eta), obs=y)


def run_curvi(x, y):
    from curvi import laplace_mle

    pyro.clear_param_store()
    x, y = torch.tensor(x), torch.tensor(y)
    start = time.perf_counter()
    fit = laplace_mle(ml_model, x, y, unit_plate="groups")
    seconds = time.perf_counter() - start
    b, sd, L = fit.params["beta"], fit.params["sd"], fit.params["L"]
    return {
        "seconds": seconds,
        "loglik": fit.log_likelihood,
        "b0": b[0].item(),
        "b1": b[1].item(),
        "sd0": sd[0].item(),
        "sd1": sd[1].item(),
        "corr": L[1, 0].item(),
        "note": f"{fit.num_iterations} L-BFGS iterations, {fit.num_evaluations} evaluations"
        + ("" if fit.converged else "; NOT converged"),
    }


def r_available():
    if shutil.which("Rscript") is None:
        return "Rscript not found (apt-get install r-base r-cran-glmmtmb r-cran-lme4)"
    probe = subprocess.run(
        ["Rscript", "-e", "library(glmmTMB); library(lme4)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return "R packages glmmTMB / lme4 not installed (apt-get install r-cran-glmmtmb r-cran-lme4)"
    return None


def run_r(x, y, which="both", timeout=1800):
    with tempfile.TemporaryDirectory() as tmp:
        data, script = os.path.join(tmp, "data.csv"), os.path.join(tmp, "fit.R")
        with open(data, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["group", "x", "y"])
            for g in range(x.shape[0]):
                for j in range(x.shape[1]):
                    writer.writerow([g, repr(float(x[g, j])), int(y[g, j])])
        Path(script).write_text(R_SCRIPT)
        proc = subprocess.run(
            ["Rscript", script, data, which], capture_output=True, text=True, timeout=timeout
        )
    results = {}
    for line in proc.stdout.splitlines():
        name, *fields = line.split()
        results[name] = {k: float(v) for k, v in (f.split("=") for f in fields)}
    if proc.returncode != 0 and not results:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return results


def warm_up():
    """One tiny fit first: the first L-BFGS step imports torch._dynamo (~1.5 s),
    a one-time cost like R's library loading, which R's timings exclude."""
    run_curvi(*simulate(20, seed=1))


def measure(sizes):
    warm_up()
    missing = r_available()
    if missing:
        print(f"[glmmTMB, glmer] skipped: {missing}")
    rows = []
    for n in sizes:
        x, y = simulate(n)
        print(f"N = {n:,}: curvi ...", end=" ", flush=True)
        results = {"curvi": run_curvi(x, y)}
        print(f"{results['curvi']['seconds']:.2f} s", flush=True)
        if missing:
            results["glmmTMB"] = results["glmer"] = {"skip": missing}
        else:
            print(f"N = {n:,}: glmmTMB and glmer (Rscript) ...", flush=True)
            results.update(run_r(x, y))
        rows.append((n, results))
    return rows


def format_table(rows):
    keys = ("b0", "b1", "sd0", "sd1", "corr")
    lines = [
        "| N groups | method | time (s) | time / curvi | logLik | logLik − glmmTMB | "
        "intercept | slope | sd(int) | sd(slope) | corr | max abs. estimate diff vs glmmTMB | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, results in rows:
        ref = results.get("glmmTMB", {})
        for method in ("curvi", "glmmTMB", "glmer"):
            r = results.get(method, {"skip": "failed"})
            if "skip" in r:
                lines.append(
                    f"| {n:,} | {method} | – | – | – | – | – | – | – | – | – | – | skipped: {r['skip']} |"
                )
                continue
            ratio = r["seconds"] / results["curvi"]["seconds"]
            has_ref = "loglik" in ref
            dll = f"{r['loglik'] - ref['loglik']:+.2e}" if has_ref else "–"
            dest = f"{max(abs(r[k] - ref[k]) for k in keys):.1e}" if has_ref else "–"
            est = " | ".join(f"{r[k]:.5f}" for k in keys)
            lines.append(
                f"| {n:,} | {method} | {r['seconds']:.3g} | {ratio:.1f}× | {r['loglik']:.4f} | "
                f"{dll} | {est} | {dest} | {r.get('note', '')} |"
            )
    return "\n".join(lines)


def summary(rows):
    lines = []
    for n, results in rows:
        c, g = results["curvi"], results.get("glmmTMB", {})
        if "loglik" not in g:
            continue
        keys = ("b0", "b1", "sd0", "sd1", "corr")
        lines.append(
            f"- N = {n:,}: curvi {g['seconds'] / c['seconds']:.1f}× faster than glmmTMB "
            f"(target at 10 000 groups: ≥ 10×); logLik differs by {c['loglik'] - g['loglik']:+.1e} "
            f"(target |Δ| ≤ 1e-3), estimates by at most "
            f"{max(abs(c[k] - g[k]) for k in keys):.1e} (target ≤ 1e-3)."
        )
    return "\n".join(lines)


def header():
    r_version = "not installed"
    if shutil.which("Rscript"):
        r_version = (
            subprocess.run(
                [
                    "Rscript",
                    "-e",
                    'cat(R.version.string, "; glmmTMB", as.character(packageVersion("glmmTMB")), '
                    '"; lme4", as.character(packageVersion("lme4")))',
                ],
                capture_output=True,
                text=True,
            ).stdout.strip()
            or "packages missing"
        )
    return (
        "# Laplace maximum likelihood: curvi against glmmTMB and glmer\n\n"
        f"`y ~ x + (x | group)`, binomial, {OBS_PER_GROUP} observations per group, simulated "
        f"(intercept {TRUTH['intercept']}, slope {TRUTH['slope']}, sds {TRUTH['sd']}, "
        f"correlation {TRUTH['corr']}). All three include standard errors in their time.\n"
        f"Machine: {os.cpu_count()} cores, {platform.machine()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}; {r_version}; {datetime.date.today().isoformat()}.\n"
        "Regenerate: `python benchmarks/marginal.py`.\n\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 groups, printed only")
    parser.add_argument("--sizes", type=int, nargs="*")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    sizes = args.sizes or ([200] if args.quick else SIZES)
    rows = measure(sizes)
    table = header() + format_table(rows) + "\n\n" + summary(rows) + "\n"
    print("\n" + table)
    if not args.quick and not args.sizes:
        RESULTS.write_text(table)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
