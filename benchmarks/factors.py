"""Benchmark: maximum likelihood with several grouping factors (crossed and
nested random effects), curvi against glmmTMB and lme4 in the same run.

Part 1, real data (lme4's, bundled in ``curvi.datasets``, with glmmTMB's
polished reference fits ``*_GLMMTMB``):

* Penicillin -- ``diameter ~ 1 + (1 | plate) + (1 | sample)``, crossed;
* Pastes -- ``strength ~ 1 + (1 | batch / cask)``, nested;
* grouseticks -- ``TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) +
  (1 | LOCATION)``, Poisson, three factors;
* InstEval -- ``y ~ 1 + (1 | s) + (1 | d)``, crossed, 73 421 rows.

Each is fitted by ``curvi.laplace_mle(model, ..., unit_plate=(...))`` with
default options, by ``glmmTMB(...)`` (defaults) and by lme4 (``lmer(...,
REML = FALSE)``; ``glmer(...)`` for grouseticks, defaults, i.e. Laplace),
the R fits run by ``Rscript`` from this script and timed inside R with
``system.time`` (R's start-up, package loading and reading the data are not
counted). Best of ``--repeats`` (default 3) for the three small data sets,
one run for InstEval, for every method.

Part 2, scaling on simulated Poisson GLMMs: ``y ~ x + (1 | school / class)``
(4 classes per school, 5 observations per class) and ``y ~ x + (1 | subject)
+ (1 | item)`` (200 items, each subject meeting 10 random items): curvi's
Hessian-vector products per Hessian, nnz of the Cholesky factor, the time of
one Laplace log-marginal evaluation with its gradient, the ``laplace_mle``
fit time, and glmmTMB's fit time on the same data (through a temporary CSV).

Usage::

    python benchmarks/factors.py                 # -> benchmarks/results/factors.md
    python benchmarks/factors.py --datasets penicillin pastes --scaling none
    python benchmarks/factors.py --repeats 5 --nested-sizes 250 2500 --crossed-sizes 1000
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

import curvi
from curvi import laplace_mle
from curvi.datasets import (
    GROUSETICKS_GLMMTMB,
    INSTEVAL_GLMMTMB,
    PASTES_GLMMTMB,
    PENICILLIN_GLMMTMB,
    load_grouseticks,
    load_insteval,
    load_pastes,
    load_penicillin,
)
from curvi.factors import FactorView
from curvi.marginal import laplace_log_marginal
from curvi.sparse_cholesky import sparse_inverse_subset
from curvi.sparse_hessian import hessian_pattern, sparse_hessian
from curvi.sparse_laplace import solve_joint_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, r_probe  # noqa: E402

sparse_hessian_module = sys.modules["curvi.sparse_hessian"]

RESULTS = Path(__file__).resolve().parent / "results" / "factors.md"
DATA_DIR = Path(curvi.datasets.__file__).resolve().parent
F64 = torch.float64


# ------------------------------------------------------------------ models
# penicillin_model, pastes_model and grouseticks_model as in tests/test_factors.py.
def penicillin_model(plate, sample, y):
    mu = pyro.param("(Intercept)", torch.tensor(20.0, dtype=F64))
    sd_plate = pyro.param("sd_plate", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    sd_sample = pyro.param("sd_sample", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    with pyro.plate("plates", 24):
        a = pyro.sample("a", dist.Normal(0.0, sd_plate))
    with pyro.plate("samples", 6):
        b = pyro.sample("b", dist.Normal(0.0, sd_sample))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + a[plate] + b[sample], sigma), obs=y)


def pastes_model(batch, sample, y):
    mu = pyro.param("(Intercept)", torch.tensor(50.0, dtype=F64))
    sd_batch = pyro.param("sd_batch", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    sd_sample = pyro.param("sd_sample", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    with pyro.plate("batches", 10):
        a = pyro.sample("a", dist.Normal(0.0, sd_batch))
    with pyro.plate("samples", 30):
        c = pyro.sample("c", dist.Normal(0.0, sd_sample))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + a[batch] + c[sample], sigma), obs=y)


def grouseticks_model(design, index, brood, location, ticks):
    beta = pyro.param("beta", torch.zeros(4, dtype=F64))
    sds = {
        name: pyro.param(f"sd_{name}", torch.tensor(0.5, dtype=F64), constraint=constraints.positive)
        for name in ("brood", "index", "location")
    }
    with pyro.plate("broods", 118):
        b = pyro.sample("b", dist.Normal(0.0, sds["brood"]))
    with pyro.plate("indices", 403):
        i = pyro.sample("i", dist.Normal(0.0, sds["index"]))
    with pyro.plate("locations", 63):
        loc = pyro.sample("loc", dist.Normal(0.0, sds["location"]))
    with pyro.plate("obs", len(ticks)):
        eta = design @ beta + b[brood] + i[index] + loc[location]
        pyro.sample("ticks", dist.Poisson(eta.exp()), obs=ticks)


def insteval_model(s, d, y, num_students, num_lecturers):
    """``y ~ 1 + (1 | s) + (1 | d)``, Gaussian."""
    mu = pyro.param("(Intercept)", torch.tensor(3.0, dtype=F64))
    sd_s = pyro.param("sd_s", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    sd_d = pyro.param("sd_d", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    with pyro.plate("students", num_students):
        a = pyro.sample("a", dist.Normal(0.0, sd_s))
    with pyro.plate("lecturers", num_lecturers):
        b = pyro.sample("b", dist.Normal(0.0, sd_d))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + a[s] + b[d], sigma), obs=y)


def nested_model(x, school, cls, y, num_schools, num_classes):
    """``y ~ x + (1 | school / class)``, Poisson; classes in a plate of their own."""
    beta = pyro.param("beta", torch.zeros(2, dtype=F64))
    sd_school = pyro.param("sd_school", torch.tensor(0.5, dtype=F64), constraint=constraints.positive)
    sd_class = pyro.param("sd_class", torch.tensor(0.5, dtype=F64), constraint=constraints.positive)
    with pyro.plate("schools", num_schools):
        a = pyro.sample("a", dist.Normal(0.0, sd_school))
    with pyro.plate("classes", num_classes):
        c = pyro.sample("c", dist.Normal(0.0, sd_class))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Poisson((beta[0] + beta[1] * x + a[school] + c[cls]).exp()), obs=y)


def crossed_model(x, subject, item, y, num_subjects, num_items):
    """``y ~ x + (1 | subject) + (1 | item)``, Poisson."""
    beta = pyro.param("beta", torch.zeros(2, dtype=F64))
    sd_subject = pyro.param("sd_subject", torch.tensor(0.5, dtype=F64), constraint=constraints.positive)
    sd_item = pyro.param("sd_item", torch.tensor(0.5, dtype=F64), constraint=constraints.positive)
    with pyro.plate("subjects", num_subjects):
        a = pyro.sample("a", dist.Normal(0.0, sd_subject))
    with pyro.plate("items", num_items):
        b = pyro.sample("b", dist.Normal(0.0, sd_item))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Poisson((beta[0] + beta[1] * x + a[subject] + b[item]).exp()), obs=y)


# ------------------------------------------------------------- data sets
class Case:
    """One real data set: the curvi call, the R code, the reference."""

    def __init__(self, key, title, design, model, args, kwargs, plates, ref, fixed, sds, r):
        self.key, self.title, self.design = key, title, design
        self.model, self.args, self.kwargs, self.plates = model, args, kwargs, plates
        self.ref = ref
        self.fixed = fixed  # curvi param holding the fixed effects
        self.sds = sds  # ref sd key -> (curvi param, R group name)
        self.r = r  # dict: file, factors, formula, family, lme4 call


def cases():
    pen = load_penicillin(dtype=F64)
    pas = load_pastes(dtype=F64)
    gt = load_grouseticks(dtype=F64)
    return {
        "penicillin": lambda: Case(
            "penicillin",
            "Penicillin",
            f"crossed: {pen.num_plates} plates × {pen.num_samples} samples, {len(pen.diameter)} rows",
            penicillin_model,
            (pen.plate, pen.sample, pen.diameter),
            {},
            ("plates", "samples"),
            PENICILLIN_GLMMTMB,
            "(Intercept)",
            {"plate": ("sd_plate", "plate"), "sample": ("sd_sample", "sample")},
            dict(
                file="penicillin.csv",
                factors=["plate", "sample"],
                formula="diameter ~ 1 + (1 | plate) + (1 | sample)",
                family="gaussian",
            ),
        ),
        "pastes": lambda: Case(
            "pastes",
            "Pastes",
            f"nested: {pas.num_samples} casks in {pas.num_batches} batches, {len(pas.strength)} rows",
            pastes_model,
            (pas.batch, pas.sample, pas.strength),
            {},
            ("samples", "batches"),
            PASTES_GLMMTMB,
            "(Intercept)",
            {"batch": ("sd_batch", "batch"), "sample": ("sd_sample", "cask:batch")},
            dict(
                file="pastes.csv",
                factors=["batch", "cask", "sample"],
                formula="strength ~ 1 + (1 | batch / cask)",
                family="gaussian",
            ),
        ),
        "grouseticks": lambda: Case(
            "grouseticks",
            "grouseticks",
            f"3 factors: {len(gt.ticks)} chicks, {gt.num_broods} broods, {gt.num_locations} locations; "
            f"{len(gt.ticks)} rows, Poisson",
            grouseticks_model,
            (gt.design, gt.index, gt.brood, gt.location, gt.ticks),
            {},
            ("indices", "broods", "locations"),
            GROUSETICKS_GLMMTMB,
            "beta",
            {
                "brood": ("sd_brood", "BROOD"),
                "index": ("sd_index", "INDEX"),
                "location": ("sd_location", "LOCATION"),
            },
            dict(
                file="grouseticks.csv",
                factors=["INDEX", "BROOD", "LOCATION", "YEAR"],
                formula="TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
                family="poisson",
            ),
        ),
        "insteval": insteval_case,
    }


def insteval_case():
    ie = load_insteval(dtype=F64)
    return Case(
        "insteval",
        "InstEval",
        f"crossed: {ie.num_students:,} students × {ie.num_lecturers:,} lecturers, {len(ie.y):,} rows",
        insteval_model,
        (ie.s, ie.d, ie.y),
        dict(num_students=ie.num_students, num_lecturers=ie.num_lecturers),
        ("students", "lecturers"),
        INSTEVAL_GLMMTMB,
        "(Intercept)",
        {"s": ("sd_s", "s"), "d": ("sd_d", "d")},
        dict(
            file="insteval.csv.gz",
            factors=["s", "d"],
            formula="y ~ 1 + (1 | s) + (1 | d)",
            family="gaussian",
        ),
    )


def reference_vector(case):
    ref = case.ref
    values = list(ref["fixed_effects"]) + [ref["sds"][k] for k in case.sds]
    if "residual_sd" in ref:
        values.append(ref["residual_sd"])
    return np.array(values)


def curvi_vector(case, params):
    values = params[case.fixed].reshape(-1).tolist()
    values += [params[p].item() for p, _ in case.sds.values()]
    if "residual_sd" in case.ref:
        values.append(params["sigma"].item())
    return np.array(values)


def r_vector(case, est):
    """The R estimates (names as printed by R_TEMPLATE) in the reference's order."""
    fixed = [v for k, v in est.items() if not k.startswith("sd:") and k != "sigma"]
    values = fixed + [est[f"sd:{group}"] for _, group in case.sds.values()]
    if "residual_sd" in case.ref:
        values.append(est["sigma"])
    return np.array(values)


# ------------------------------------------------------------------ R side
R_HELPERS = r"""
fmt <- function(x) sprintf("%.15g", x)
clean <- function(x) gsub("[\t\r\n]+", " ", x)
run <- function(method, repeats, fitfun, extract) {
  for (r in seq_len(repeats)) {
    warns <- character(0)
    tryCatch({
      elapsed <- system.time(fit <- withCallingHandlers(fitfun(), warning = function(w) {
        warns <<- c(warns, conditionMessage(w))
        invokeRestart("muffleWarning")
      }))[["elapsed"]]
      ex <- extract(fit)
      cat("RESULT", method, r, fmt(elapsed), fmt(ex$loglik),
          paste(names(ex$est), fmt(ex$est), sep = "=", collapse = ";"),
          clean(paste(c(ex$note, unique(warns)), collapse = " | ")), sep = "\t")
      cat("\n")
    }, error = function(e) {
      cat("ERROR", method, r, clean(conditionMessage(e)), sep = "\t")
      cat("\n")
    })
    rm(list = intersect("fit", ls()))
    invisible(gc())
  }
}
tmb_extract <- function(fit, gaussian) {
  vc <- VarCorr(fit)$cond
  sds <- sapply(vc, function(v) attr(v, "stddev")[[1]])
  est <- c(fixef(fit)$cond, setNames(sds, paste0("sd:", names(vc))))
  if (gaussian) est <- c(est, sigma = sigma(fit))
  note <- sprintf("%s (code %s), pdHess %s", fit$fit$message, fit$fit$convergence,
                  fit$sdr$pdHess)
  list(loglik = as.numeric(logLik(fit)), est = est, note = note)
}
lme4_extract <- function(fit, gaussian) {
  vc <- as.data.frame(VarCorr(fit))
  re <- vc[vc$grp != "Residual", ]
  est <- c(fixef(fit), setNames(re$sdcor, paste0("sd:", re$grp)))
  if (gaussian) est <- c(est, sigma = sigma(fit))
  msgs <- fit@optinfo$conv$lme4$messages
  note <- paste0("optimizer code ", fit@optinfo$conv$opt,
                 if (length(msgs)) paste0("; ", paste(msgs, collapse = " | ")) else "",
                 if (isSingular(fit)) "; singular fit" else "")
  list(loglik = as.numeric(logLik(fit)), est = est, note = note)
}
"""


def r_code(file, factors, formula, family, methods, repeats):
    """R code fitting ``formula`` to the CSV ``file`` by ``methods``."""
    gaussian = "TRUE" if family == "gaussian" else "FALSE"
    reader = f'gzfile("{file}")' if str(file).endswith(".gz") else f'"{file}"'
    lines = [
        "suppressPackageStartupMessages({",
        *[f"  library({m})" for m in methods],
        "})",
        R_HELPERS,
        f"d <- read.csv({reader})",
        *[f"d${f} <- factor(d${f})" for f in factors],
        f"form <- {formula}",
    ]
    if "glmmTMB" in methods:
        lines.append(
            f'run("glmmTMB", {repeats}, function() glmmTMB(form, data = d, family = {family}), '
            f"function(f) tmb_extract(f, {gaussian}))"
        )
    if "lme4" in methods:
        call = (
            "lmer(form, data = d, REML = FALSE)"
            if family == "gaussian"
            else f"glmer(form, data = d, family = {family})"
        )
        lines.append(f'run("lme4", {repeats}, function() {call}, function(f) lme4_extract(f, {gaussian}))')
    return "\n".join(lines)


def run_r(code, timeout):
    """Run R code; parse its RESULT/ERROR lines into {method: [result, ...]} and errors."""
    try:
        proc = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, {"*": f"Rscript timed out after {timeout} s"}
    results, errors = {}, {}
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if parts[0] == "RESULT" and len(parts) >= 7:
            est = dict(kv.split("=", 1) for kv in parts[5].split(";") if kv)
            results.setdefault(parts[1], []).append(
                dict(
                    seconds=float(parts[3]),
                    loglik=float(parts[4]),
                    est={k: float(v) for k, v in est.items()},
                    note=parts[6],
                )
            )
        elif parts[0] == "ERROR":
            errors[parts[1]] = parts[3] if len(parts) > 3 else "error"
    if proc.returncode != 0 and not results:
        errors["*"] = f"Rscript exit {proc.returncode}: " + " ".join(proc.stderr.strip().splitlines()[-3:])
    return results, errors


def timed_mle(model, args, kwargs, plates):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # init_to_median draws from the prior: the same start in every run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        fit = laplace_mle(model, *args, unit_plate=plates, **kwargs)
        seconds = time.perf_counter() - start
    return seconds, fit, [str(w.message) for w in caught]


def pattern_stats(model, args, kwargs, plates):
    """Products per Hessian, nnz(lower H), nnz(L), nested, latents: at the
    params now in the store (the estimates), the modes solved from scratch.
    Also returns the view, the modes and the log marginal there."""
    view = FactorView(model, *args, unit_plate=plates, **kwargs)
    value, modes = laplace_log_marginal(view, view.init_theta, view.init_y)
    pattern = modes.pattern
    factor = pattern.lower.factor(modes.precision)
    stats = dict(
        products=pattern.num_products,
        nnz_h=pattern.lower.nnz,
        nnz_l=factor.nnz,
        nested=pattern.nested,
        latents=view.latent_dim,
    )
    return stats, view, modes, float(value)


def quick_pattern(model, args, kwargs, plates):
    """Products per Hessian and nnz(L) from the pattern alone: read off the
    model by ``hessian_pattern`` without its final check (one batched
    product over every row), nnz(L) from a CHOLMOD factor of a diagonally
    dominant matrix on the pattern (the fill does not depend on the values).
    Memory linear in the rows, not in rows × products."""
    view = FactorView(model, *args, unit_plate=plates, **kwargs)
    with mock.patch.object(sparse_hessian_module, "_check_pattern", lambda *a, **k: None):
        pattern = hessian_pattern(view, view.init_theta, view.init_y)
    lower = pattern.lower
    rows, cols = np.asarray(lower.rows), np.asarray(lower.cols)
    off = rows != cols
    degree = np.bincount(rows[off], minlength=lower.n) + np.bincount(cols[off], minlength=lower.n)
    values = np.where(off, -1.0, 1.0 + degree[rows].astype(np.float64))
    factor = lower.factor(torch.as_tensor(values))
    return dict(
        products=pattern.num_products,
        nnz_h=lower.nnz,
        nnz_l=factor.nnz,
        nested=pattern.nested,
        latents=view.latent_dim,
        checked=False,
    )


def available_memory():
    """MemAvailable (GB) from /proc/meminfo; inf when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return math.inf


def resident_memory():
    """This process's resident set size (bytes), from /proc/self/statm."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak resident memory above the start (GB), sampled every 20 ms by a thread."""

    def __enter__(self):
        self.base = self.peak = resident_memory()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, resident_memory())
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_memory())

    @property
    def extra(self):
        return (self.peak - self.base) / 1e9


def timed_evaluation(view, modes):
    """One Laplace log-marginal evaluation with its gradient in the params,
    warm-started at ``modes``, after one warm-up call."""
    theta = view.init_theta
    for _ in range(2):  # a warm-up call, then the timed one
        start = time.perf_counter()
        value, result = laplace_log_marginal(view, theta, modes.y, create_graph=True)
        value.backward()
        seconds = time.perf_counter() - start
        modes = result
    return seconds, result.num_iterations


def cost_row(label, view, modes, eval_seconds):
    """Where one evaluation with its gradient (``eval_seconds``, from
    :func:`timed_evaluation` at ``modes``) goes: the Newton solve of the modes
    warm-started there (its Hessian without graph, factor, step), the
    differentiable Hessian (the products with ``create_graph``), and
    Takahashi's sparse inverse subset (the log-determinant's gradient); the
    rest is the differentiable Newton step, the log-determinant and the
    backward pass."""
    theta = view.init_theta
    start = time.perf_counter()
    solved = solve_joint_modes(view, theta, modes.y)
    newton = time.perf_counter() - start
    with torch.enable_grad():
        start = time.perf_counter()
        sparse_hessian(view, theta, solved.y, solved.pattern, create_graph=True)
        graph = time.perf_counter() - start
    start = time.perf_counter()
    sparse_inverse_subset(solved.pattern.lower, solved.precision)
    takahashi = time.perf_counter() - start
    rest = eval_seconds - newton - graph - takahashi

    def share(t):
        return f"{t:.3f} ({t / eval_seconds:.0%})"

    print(
        f"  one evaluation {eval_seconds:.3f} s: Newton {newton:.3f}, Hessian with graph {graph:.3f}, "
        f"Takahashi {takahashi:.3f}, rest {rest:.3f}",
        flush=True,
    )
    row = (
        f"| {label} | {solved.pattern.num_products} | {eval_seconds:.3f} | {share(newton)} | "
        f"{share(graph)} | "
        f"{share(takahashi)} | {share(rest)} |"
    )
    parts = {
        "the Newton solve": newton,
        "the Hessian with graph": graph,
        "Takahashi's sparse inverse subset": takahashi,
        "the rest (differentiable Newton step, log-determinant, backward pass)": rest,
    }
    return row, (label, parts)


# ------------------------------------------------------------------ formatting
def fmt_ll(x):
    return "–" if x is None or not math.isfinite(x) else f"{x:,.6f}"


def fmt_diff(x):
    return "–" if x is None or not math.isfinite(x) else f"{x:+.1e}"


def fmt_sec(x):
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def cell(text):
    """Text for a Markdown table cell (pipes escaped)."""
    return text.replace("|", "\\|")


def fmt_duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def fmt_ratio(x):
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def best(runs):
    return min(runs, key=lambda r: r["seconds"])


def load_average():
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def real_data(names, repeats, r_missing, r_timeout, costs):
    rows, hessian_rows, summary = [], [], {}
    make = cases()
    for name in names:
        case = make[name]()
        n = repeats if name != "insteval" else 1
        print(f"\n== {case.title} ({case.design}); {n} run(s) per method", flush=True)
        ref_ll, ref_vec = case.ref["log_likelihood"], reference_vector(case)
        # curvi
        runs = []
        for _ in range(n):
            seconds, fit, caught = timed_mle(case.model, case.args, case.kwargs, case.plates)
            runs.append(dict(seconds=seconds, fit=fit, warnings=caught))
            print(f"  curvi: {seconds:.3f} s, logLik {fit.log_likelihood:.9f}, {fit.message}", flush=True)
        c = best(runs)
        fit = c["fit"]
        stats, view, modes, _ = pattern_stats(case.model, case.args, case.kwargs, case.plates)
        if name == "insteval":  # where one evaluation's time goes, at the estimates
            eval_seconds, _ = timed_evaluation(view, modes)
            costs.append(cost_row(case.title, view, modes, eval_seconds))
        del view, modes
        delta = np.abs(curvi_vector(case, fit.params) - ref_vec).max()
        note = f"{'converged' if fit.converged else 'NOT converged'}: {fit.message.split(': ', 1)[1]}"
        note += f"; {fit.num_evaluations} evaluations"
        converged_runs = sum(r["fit"].converged for r in runs)
        if len(runs) > 1:
            note += f"; {converged_runs} of {len(runs)} runs converged"
        if c["warnings"]:
            note += "; warnings: " + " | ".join(sorted(set(c["warnings"])))[:200]
        curvi_seconds = c["seconds"]
        entry = dict(
            converged=fit.converged,
            message=fit.message,
            method="curvi laplace_mle",
            loglik=fit.log_likelihood,
            diff=fit.log_likelihood - ref_ll,
            delta=delta,
            seconds=curvi_seconds,
            ratio=None,
            note=note,
        )
        summary[name] = {"curvi": entry, "stats": stats, "title": case.title}
        table = [entry]
        hessian_rows.append(
            f"| {case.title} | {stats['latents']:,} | {stats['products']} | {stats['nnz_h']:,} | "
            f"{stats['nnz_l']:,} | {'yes' if stats['nested'] else 'no'} |"
        )
        print(f"  pattern: {stats}", flush=True)
        # R
        methods = [m for m in ("glmmTMB", "lme4") if r_missing.get(m) is None]
        results, errors = {}, {}
        if methods:
            code = r_code(
                DATA_DIR / case.r["file"], case.r["factors"], case.r["formula"], case.r["family"], methods, n
            )
            results, errors = run_r(code, r_timeout)
        for method in ("glmmTMB", "lme4"):
            label = (
                method
                if method == "glmmTMB"
                else ("lme4 lmer" if case.r["family"] == "gaussian" else "lme4 glmer")
            )
            if r_missing.get(method) is not None:
                entry = dict(method=label, missing=f"not run: {r_missing[method]}")
            elif method not in results:
                reason = errors.get(method) or errors.get("*") or "no output"
                print(f"  {method}: failed: {reason}", flush=True)
                entry = dict(method=label, missing=f"not run: {reason[:150]}")
            else:
                b = best(results[method])
                for r in results[method]:
                    print(f"  {method}: {r['seconds']:.3f} s, logLik {r['loglik']:.9f}", flush=True)
                try:
                    delta = np.abs(r_vector(case, b["est"]) - ref_vec).max()
                except KeyError as missing:
                    delta, b["note"] = math.nan, b["note"] + f"; estimate {missing} not printed"
                entry = dict(
                    method=label,
                    loglik=b["loglik"],
                    diff=b["loglik"] - ref_ll,
                    delta=delta,
                    seconds=b["seconds"],
                    ratio=curvi_seconds / b["seconds"] if b["seconds"] > 0 else math.nan,
                    note=b["note"] + (f"; {len(errors)} failed run(s)" if method in errors else ""),
                )
            summary[name][method] = entry
            table.append(entry)
        for i, e in enumerate(table):
            first = i == 0
            lead = f"| {case.title if first else ''} | {case.design if first else ''} | {e['method']} |"
            if "missing" in e:
                rows.append(lead + f" – | – | – | – | – | {cell(e['missing'])} |")
            else:
                rows.append(
                    lead + f" {fmt_ll(e['loglik'])} | {fmt_diff(e['diff'])} | {e['delta']:.1e} | "
                    f"{fmt_sec(e['seconds'])} | {fmt_ratio(e['ratio'])} | {cell(e['note'])} |"
                )
    return rows, hessian_rows, summary


# ------------------------------------------------------------------ part 2
def simulate_nested(num_schools, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_classes = 4 * num_schools
    cls = torch.arange(num_classes).repeat_interleave(5)
    school = cls // 4
    x = torch.randn(len(cls), generator=g, dtype=F64)
    a = 0.5 * torch.randn(num_schools, generator=g, dtype=F64)
    c = 0.3 * torch.randn(num_classes, generator=g, dtype=F64)
    y = torch.poisson((0.2 + 0.4 * x + a[school] + c[cls]).exp(), generator=g)
    return (
        (x, school, cls, y),
        dict(num_schools=num_schools, num_classes=num_classes),
        ("schools", "classes"),
        ["x", "school", "class", "y"],
        "y ~ x + (1 | school) + (1 | class)",
    )


def simulate_crossed(num_subjects, num_items=200, per_subject=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    subject = torch.arange(num_subjects).repeat_interleave(per_subject)
    item = torch.cat(
        [
            torch.argsort(torch.rand(min(num_subjects - at, 10_000), num_items, generator=g), dim=1)[
                :, :per_subject
            ]
            for at in range(0, num_subjects, 10_000)
        ]
    ).reshape(-1)
    x = torch.randn(len(subject), generator=g, dtype=F64)
    a = 0.5 * torch.randn(num_subjects, generator=g, dtype=F64)
    b = 0.3 * torch.randn(num_items, generator=g, dtype=F64)
    y = torch.poisson((0.2 + 0.4 * x + a[subject] + b[item]).exp(), generator=g)
    return (
        (x, subject, item, y),
        dict(num_subjects=num_subjects, num_items=num_items),
        ("subjects", "items"),
        ["x", "subject", "item", "y"],
        "y ~ x + (1 | subject) + (1 | item)",
    )


def scaling(kind, sizes, r_missing, fit_limit, r_timeout, notes, costs):
    model = nested_model if kind == "nested" else crossed_model
    simulate = simulate_nested if kind == "nested" else simulate_crossed
    rows, measured, previous = [], [], None
    for size in sizes:
        args, kwargs, plates, columns, formula = simulate(size)
        x, g1, g2, y = args
        label = f"{size:,} schools × 4 classes" if kind == "nested" else f"{size:,} subjects × 200 items"
        print(f"\n== scaling, {kind}: {label}, {len(y):,} rows", flush=True)
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        # the pattern alone first (cheap), to predict this size's cost from the previous one's
        quick = quick_pattern(model, args, kwargs, plates)
        print(f"  pattern read: {quick}", flush=True)
        fit_seconds, fit, eval_seconds, eval_memory, skip_eval, skip_fit = None, None, None, None, None, None
        if previous is not None and previous["eval"] is not None:
            scale = (len(y) * quick["products"]) / (previous["rows"] * previous["products"])
            memory = previous["memory"] * scale
            available = available_memory()
            if memory > 0.5 * available:
                skip_eval = (
                    f"curvi not run: one evaluation with its gradient predicted to need {memory:.0f} GB "
                    f"(the previous size's {previous['memory']:.1f} GB × rows × products, {scale:.0f}×), "
                    f"over half the {available:.0f} GB available"
                )
            if skip_eval and previous["fit"] is not None and previous["fit"] * scale > fit_limit:
                skip_fit = (
                    f"fit not run: predicted {fmt_duration(previous['fit'] * scale)} (the previous size's "
                    f"fit × rows × products) > the {fmt_duration(fit_limit)} limit"
                )
        if skip_eval:
            stats = quick
            for reason in (skip_eval, skip_fit):
                if reason:
                    notes.append(f"{kind.capitalize()} design at {size:,}: {reason}.")
                    print("  " + reason, flush=True)
        else:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            stats, view, modes, _ = pattern_stats(model, args, kwargs, plates)
            print(f"  pattern: {stats}", flush=True)
            with PeakMemory() as peak:
                eval_seconds, _ = timed_evaluation(view, modes)
            eval_memory = peak.extra
            print(f"  evaluation + gradient: {eval_seconds:.3f} s, {eval_memory:.2f} GB", flush=True)
            costs.append(cost_row(f"{kind}, {label}", view, modes, eval_seconds))
            del view, modes
            if previous is not None and previous["fit"] is not None:
                predicted = previous["fit"] * eval_seconds / previous["eval"]
                if predicted > fit_limit:
                    skip_fit = (
                        f"fit not run: predicted {fmt_duration(predicted)} (this evaluation time × the "
                        f"previous size's fit / evaluation time) > the {fmt_duration(fit_limit)} limit"
                    )
            if skip_fit:
                notes.append(f"{kind.capitalize()} design at {size:,}: {skip_fit}.")
                print("  " + skip_fit, flush=True)
            else:
                fit_seconds, fit, caught = timed_mle(model, args, kwargs, plates)
                print(
                    f"  fit: {fit_seconds:.2f} s, logLik {fit.log_likelihood:.6f}, {fit.message}", flush=True
                )
        fit_note = (
            skip_eval
            or skip_fit
            or f"{'converged' if fit.converged else 'NOT converged'}, {fit.num_evaluations} evaluations"
        )
        # glmmTMB on the same data
        tmb_seconds, tmb_ll, tmb_note = None, None, ""
        if r_missing.get("glmmTMB") is not None:
            tmb_note = f"glmmTMB not run: {r_missing['glmmTMB']}"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "data.csv"
                table = np.column_stack([x.numpy(), g1.numpy() + 1, g2.numpy() + 1, y.numpy()])
                np.savetxt(
                    path,
                    table,
                    delimiter=",",
                    header=",".join(columns),
                    comments="",
                    fmt=["%.17g", "%d", "%d", "%d"],
                )
                code = r_code(path, columns[1:3], formula, "poisson", ["glmmTMB"], 1)
                results, errors = run_r(code, r_timeout)
            if "glmmTMB" in results:
                r = results["glmmTMB"][0]
                tmb_seconds, tmb_ll = r["seconds"], r["loglik"]
                if not r["note"].startswith("relative convergence") and not r["note"].startswith(
                    "X-convergence"
                ):
                    tmb_note = f"glmmTMB: {r['note']}"
                print(f"  glmmTMB: {tmb_seconds:.2f} s, logLik {tmb_ll:.6f} ({r['note']})", flush=True)
            else:
                reason = errors.get("glmmTMB") or errors.get("*") or "no output"
                tmb_note = f"glmmTMB not run: {reason[:150]}"
                print("  " + tmb_note, flush=True)
        diff = fit.log_likelihood - tmb_ll if fit is not None and tmb_ll is not None else None
        note = "; ".join(n for n in (fit_note, tmb_note) if n)
        rows.append(
            f"| {kind} | {label} | {len(y):,} | {stats['latents']:,} | {stats['products']} | "
            f"{stats['nnz_l']:,}{'' if 'checked' not in stats else ' †'} | {fmt_sec(eval_seconds)} | "
            f"{'–' if eval_memory is None else f'{eval_memory:.2f}'} | {fmt_sec(fit_seconds)} | "
            f"{fmt_sec(tmb_seconds)} | "
            f"{fmt_ratio(fit_seconds / tmb_seconds if fit_seconds and tmb_seconds else None)} | "
            f"{fmt_diff(diff)} | {cell(note)} |"
        )
        entry = dict(
            size=size,
            rows=len(y),
            memory=eval_memory,
            latents=stats["latents"],
            products=stats["products"],
            nnz_l=stats["nnz_l"],
            eval=eval_seconds,
            fit=fit_seconds,
            tmb=tmb_seconds,
            diff=diff,
            nested=stats["nested"],
        )
        measured.append(entry)
        previous = entry
    return rows, measured


# ------------------------------------------------------------------ reading
def reading(summary, scaled, notes, costs):
    parts = []
    curvi_rows = [(s["title"], s["curvi"]) for s in summary.values()]
    if curvi_rows:
        worst = max(curvi_rows, key=lambda t: abs(t[1]["diff"]))
        worst_delta = max(curvi_rows, key=lambda t: t[1]["delta"])
        unconverged = [f"{t} ({e['message']})" for t, e in curvi_rows if not e["converged"]]
        parts.append(
            f"curvi's `laplace_mle` reproduces glmmTMB's polished reference on all {len(curvi_rows)} data "
            f"sets to {abs(worst[1]['diff']):.1e} nats in logLik (largest on {worst[0]}) and "
            f"{worst_delta[1]['delta']:.1e} in the estimates (largest on {worst_delta[0]})"
            + (
                f"; the run timed stopped short of its gradient tolerance on {', '.join(unconverged)}"
                if unconverged
                else ""
            )
            + "."
        )
        for peer in ("glmmTMB", "lme4"):
            entries = [(s["title"], s[peer]) for s in summary.values() if "seconds" in s.get(peer, {})]
            if not entries:
                continue
            far = [(t, e) for t, e in entries if abs(e["diff"]) > 1e-5]
            largest = max(abs(e["diff"]) for _, e in entries)
            text = f"{peer} with its defaults: logLik within {largest:.1e} of the reference"
            if far:
                text += " (beyond 1e-5 on " + ", ".join(f"{t}: {e['diff']:+.1e}" for t, e in far) + ")"
            ratios = ", ".join(f"{t} {e['ratio']:.2f}×" for t, e in entries)
            parts.append(f"{text}; curvi's time / {peer}'s: {ratios}.")
    if summary:
        parts.append(
            "curvi's sparse Hessian: "
            + "; ".join(
                f"{s['title']} {s['stats']['products']} products per Hessian for {s['stats']['latents']:,} "
                f"latents, fill nnz(L) − nnz(lower H) = {s['stats']['nnz_l'] - s['stats']['nnz_h']:,}"
                for s in summary.values()
            )
            + "."
        )
    for kind, rows in scaled.items():
        if len(rows) < 2:
            continue
        first, last = rows[0], rows[-1]
        growth = last["latents"] / first["latents"]
        products = " → ".join(str(r["products"]) for r in rows)
        text = (
            f"Scaling, {kind} ({'nested' if all(r['nested'] for r in rows) else 'not nested'}): "
            f"from {first['latents']:,} to {last['latents']:,} latents ({growth:.0f}×) the products per "
            f"Hessian go {products}"
        )
        timed = [r for r in rows if r["eval"] is not None]
        if len(timed) >= 2:
            evals = " → ".join(f"{r['eval']:.3g} s" for r in timed)
            g = timed[-1]["latents"] / timed[0]["latents"]
            per = " → ".join(f"{r['eval'] / (r['rows'] * r['products']) * 1e9:.0f} ns" for r in timed)
            text += (
                f"; one evaluation with its gradient {evals} ({timed[-1]['eval'] / timed[0]['eval']:.1f}× "
                f"the time for {g:.0f}× the units), i.e. {per} per row and product"
            )
        fits = [r for r in rows if r["fit"] is not None]
        if len(fits) >= 2:
            text += "; the fit " + " → ".join(f"{r['fit']:.3g} s" for r in fits)
        tmbs = [r for r in rows if r["tmb"] is not None]
        if tmbs:
            text += "; glmmTMB's fit " + " → ".join(f"{r['tmb']:.3g} s" for r in tmbs)
        both = [r for r in fits if r["tmb"] is not None]
        if both:
            text += "; curvi / glmmTMB fit time " + ", ".join(f"{r['fit'] / r['tmb']:.2f}×" for r in both)
        diffs = [r["diff"] for r in rows if r["diff"] is not None]
        if diffs:
            text += f"; logLik within {max(abs(d) for d in diffs):.1e} of glmmTMB's"
            if max(diffs) > 1e-6:
                text += f" (curvi's the higher, by up to {max(diffs):.1e})"
        parts.append(text + ".")
    if costs:
        largest = []
        for label, parts_ in costs:
            name, seconds = max(parts_.items(), key=lambda kv: kv[1])
            largest.append(f"{label}: {name} ({seconds / sum(parts_.values()):.0%})")
        parts.append("The largest part of one evaluation with its gradient: " + "; ".join(largest) + ".")
    parts.extend(notes)
    return "\n\n".join(parts)


# ------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets",
        nargs="*",
        default=["penicillin", "pastes", "grouseticks", "insteval"],
        choices=["penicillin", "pastes", "grouseticks", "insteval"],
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per method on the small data sets (best taken)"
    )
    parser.add_argument(
        "--scaling", nargs="*", default=["nested", "crossed"], choices=["nested", "crossed", "none"]
    )
    parser.add_argument("--nested-sizes", type=int, nargs="*", default=[250, 2_500, 25_000])
    parser.add_argument("--crossed-sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument(
        "--fit-limit", type=float, default=600.0, help="skip a scaling fit predicted to take longer (s)"
    )
    parser.add_argument("--r-timeout", type=float, default=1800.0, help="seconds per Rscript call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (R runs on one)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_default_dtype(F64)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    r_version, r_missing = r_probe()
    print(f"R: {r_version}; missing: { {k: v for k, v in r_missing.items() if v} }", flush=True)

    cost_rows = []
    rows, hessian_rows, summary = real_data(args.datasets, args.repeats, r_missing, args.r_timeout, cost_rows)
    notes, scaled, scale_rows = [], {}, []
    for kind in [k for k in args.scaling if k != "none"]:
        sizes = args.nested_sizes if kind == "nested" else args.crossed_sizes
        r, m = scaling(kind, sizes, r_missing, args.fit_limit, args.r_timeout, notes, cost_rows)
        scale_rows += r
        scaled[kind] = m
    total = time.perf_counter() - started
    cost_parts = [parts for _, parts in cost_rows]

    command = "python benchmarks/factors.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    header = (
        "# Several grouping factors: curvi's Laplace ML against glmmTMB and lme4\n\n"
        f"Machine: {os.cpu_count()} cores ({cpu_name()}), Python {platform.python_version()}, "
        f"torch {torch.__version__} ({args.threads} thread{'s' if args.threads > 1 else ''}), "
        f"pyro {pyro.__version__}; {r_version or 'R not available'} (R single-threaded, reference BLAS); "
        f"{datetime.date.today().isoformat()}; float64. Command: `{command}` "
        f"(whole run {total / 60:.1f} min; load average 1/5/15 min {load_start} at the start, "
        f"{load_average()} at the end: the machine is shared).\n\n"
        f"Fits: `curvi.laplace_mle(model, ..., unit_plate=(...))` with default options; `glmmTMB(...)` with "
        "its defaults; lme4's `lmer(..., REML = FALSE)` (Gaussian) or `glmer(...)` (Poisson, defaults: "
        "Laplace). Seconds are wall-clock of the fit call alone: for R measured inside R by "
        '`system.time(...)["elapsed"]` (R start-up, package loading and reading the data excluded), '
        "for curvi around the `laplace_mle` call (which includes reading the Hessian pattern off the "
        f"model and the standard errors; every curvi fit starts from `pyro.set_rng_seed(0)`, as "
        "`init_to_median` draws from the prior; the first fit of the process also pays one-off start-up "
        "costs, which the best of several runs leaves out). "
        f"Best of {args.repeats} runs for Penicillin, Pastes and "
        "grouseticks, 1 run for InstEval, for every method, all in this run. Δ logLik is against "
        "glmmTMB's polished reference fit (`curvi.datasets.*_GLMMTMB`); max |Δ estimate| is over the "
        "fixed effects, the random-effect sds and the residual sd against the same reference. "
        "ratio = curvi's seconds / this method's seconds.\n\n"
    )
    text = header
    if rows:
        text += (
            "| data set | design | method | logLik | Δ logLik vs reference | max \\|Δ estimate\\| | "
            "seconds | ratio curvi / this | notes |\n|---|---|---|---:|---:|---:|---:|---:|---|\n"
            + "\n".join(rows)
            + "\n\ncurvi's sparse Hessian of the random effects (at the estimates): Hessian-vector products "
            "per Hessian (`pattern.num_products`), stored entries of its lower triangle and of the "
            "Cholesky factor (CHOLMOD, AMD order; `SparsePattern.factor(...).nnz`), and whether the "
            "factors nest (`pattern.nested`: of every two factors that share terms, each unit of one "
            "meets one unit of the other; CHOLMOD then factors without fill).\n\n"
            "| data set | latents | products per Hessian | nnz(lower H) | nnz(L) | nested |\n"
            "|---|---:|---:|---:|---:|---|\n" + "\n".join(hessian_rows) + "\n"
        )
    if scale_rows:
        text += (
            "\n## Scaling (simulated Poisson GLMMs)\n\n"
            "Nested: `y ~ x + (1 | school / class)`, 4 classes per school, 5 observations per class "
            "(class ids unique, so glmmTMB's `(1 | school) + (1 | class)` is the same model). Crossed: "
            "`y ~ x + (1 | subject) + (1 | item)`, 200 items, each subject meets 10 distinct random items. "
            "Simulated with intercept 0.2, slope 0.4, sds 0.5 (school / subject) and 0.3 (class / item). "
            "`eval` is one `laplace_log_marginal(view, θ, y, create_graph=True)` followed by "
            "`backward()` at the initial `pyro.param` values, its "
            "modes warm-started at the warm-up call's, timed after that warm-up call; `fit` is "
            "`laplace_mle` with default options; glmmTMB (defaults) is timed inside R on the same data "
            "(written to a temporary CSV), one run each. `eval memory` is how far the process's resident "
            "memory rose above its level at the start of the warm-up and the timed evaluation (sampled "
            "every 20 ms; memory the process already holds from earlier steps is reused first, so small "
            "cases read 0). † nnz(L) from "
            "the pattern alone (read off the model without its final check, factored with "
            "placeholder values): that size's curvi evaluation was not run.\n\n"
            "| design | size | rows | latents | products per Hessian | nnz(L) | eval (s) | "
            "eval memory (GB) | "
            "curvi fit (s) | glmmTMB fit (s) | ratio curvi / glmmTMB | logLik curvi − glmmTMB | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(scale_rows) + "\n"
        )
    if cost_rows:
        text += (
            "\n## Where one evaluation's time goes\n\n"
            "One Laplace log-marginal evaluation with its gradient (as `eval` above; for InstEval at the "
            "estimates), split by timing its parts separately: the Newton solve of the modes "
            "warm-started at the mode (one Hessian without graph, its CHOLMOD factor and the step), "
            "the differentiable Hessian (the products with `create_graph=True`), Takahashi's sparse "
            "inverse subset (`sparse_inverse_subset`, the log-determinant's gradient); the rest is the "
            "evaluation's time minus these (the differentiable Newton step, the log-determinant's factor and "
            "the backward pass through the products' graph).\n\n"
            "| case | products per Hessian | evaluation (s) | Newton solve (s) | Hessian with graph (s) | "
            "Takahashi (s) | rest (s) |\n|---|---:|---:|---:|---:|---:|---:|\n"
            + "\n".join(row for row, _ in cost_rows)
            + "\n"
        )
    text += "\n## Reading\n\n" + reading(summary, scaled, notes, cost_parts) + "\n"
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
