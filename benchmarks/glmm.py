"""Benchmark: the formula front end ``curvi.glmm`` against glmmTMB and lme4,
side by side, on the ten reference cases of ``curvi.datasets.glmm_references()``.

For each case (its data set from ``curvi.datasets.load_frame``, the formula
in curvi's syntax, family and weights as in ``glmm_reference.json``), in one
run:

* curvi: ``curvi.glmm(formula, frame, family=..., weights=...)`` (model
  building: formulae, design tensors; timed in a column of its own) and
  ``.fit("ml")`` (Laplace ML by ``laplace_mle``, default options, float64:
  the fit alone, standard errors included). One warm-up fit of a small case
  first (imports, torch._dynamo's first-call set-up), then each case once,
  repeated to 3 runs (median) when the first took under ``--repeat-below``
  seconds. Reported: log-likelihood evaluations (``fit.laplace.num_evaluations``),
  logLik − glmmTMB's polished reference logLik, max |fixed effect − reference|.
* glmmTMB (the reference's ``r_command``, defaults: Laplace, ML, standard
  errors by ``sdreport``) and lme4 (``lmer(..., REML = FALSE)`` or
  ``glmer(...)`` with their defaults), in one ``Rscript`` process that reads
  the CSVs as ``benchmarks/reference/glmm.R`` does (the factor columns as
  factors) and times each fit with ``system.time`` (median of 3; R's start-up,
  package loading and data reading excluded). Skipped with a message when
  Rscript or the packages are missing. lme4 is not run on the nbinom2 case:
  ``glmer.nb`` is not the same objective (it alternates between the
  dispersion by ``theta.ml`` and glmer fits, and its Laplace log determinant
  uses the expected information, not the observed Hessian: 0.18 nats below
  glmmTMB's at the optimum, see glmm.R). For the weighted case (glmmTMB's
  weights multiply each row's log-likelihood; lmer's are precision weights,
  another model) lmer fits the rows repeated w times, the same likelihood.
* The Bayesian paths on two cases (cbpp_binomial, sleepstudy_correlated):
  wall time of ``fit("guide")`` (default options) and of ``fit("nuts",
  num_samples=500, warmup_steps=500)``. NUTS runs a 100 + 100 pilot first;
  when the pilot extrapolates (linearly in iterations) above
  ``--nuts-limit`` seconds the full run is not made and the row says so,
  with the pilot's time and the extrapolation marked as such.
* A profile (cProfile) of one ML fit of each ``--profile`` case (default a
  one-factor and a two-factor case; after the warm-up): where its time goes.

Usage::

    python benchmarks/glmm.py                          # -> benchmarks/results/glmm.md
    python benchmarks/glmm.py --cases cbpp_binomial pastes_nested --bayes none --profile none
    python benchmarks/glmm.py --nuts-limit 300 --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# One BLAS thread, set before numpy / scipy load OpenBLAS: curvi's sparse path calls
# scipy, whose OpenBLAS otherwise starts a thread per core. On a shared 2-core machine
# that made the several-factor fits 2-3x slower and erratic (pastes_nested 2.1 s down
# to 0.38 s over six successive fits in one process, CPU time twice the wall time);
# with one thread they take a steady 0.43 s. R runs on its single-threaded reference
# BLAS, and torch on --threads intra-op threads (default 1). An OPENBLAS_NUM_THREADS
# already in the environment is kept (and reported in the results).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pyro
import torch

import curvi
import curvi.marginal as marginal_module
from curvi.datasets import glmm_references, load_frame

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, curvi_revision, r_probe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "glmm.md"
DATA_DIR = Path(curvi.datasets.__file__).resolve().parent
BAYES_CASES = ("cbpp_binomial", "sleepstudy_correlated")
PROFILE_CASES = ("sleepstudy_correlated", "grouseticks_poisson")  # one grouping factor; two
WARM_UP_CASE = "pastes_nested"

# The CSVs' factor columns, as glmm.R reads them (read_frame).
R_FACTORS = {
    "cbpp": ["herd", "period"],
    "sleepstudy": ["Subject"],
    "contraception": ["woman", "district", "livch", "urban"],
    "grouseticks": ["INDEX", "BROOD", "YEAR", "LOCATION"],
    "pastes": ["batch", "cask", "sample"],
}


LOAD_SEEN = []  # every 1-minute load average read during the run


def load_average():
    one, five, fifteen = os.getloadavg()
    LOAD_SEEN.append(one)
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def stem(dataset):
    return dataset.removesuffix(".gz").removesuffix(".csv")


# ------------------------------------------------------------------ R side
R_HEADER = r"""
suppressPackageStartupMessages({library(lme4); library(glmmTMB)})
data_dir <- commandArgs(trailingOnly = TRUE)[1]
repeats <- as.integer(commandArgs(trailingOnly = TRUE)[2])
read_frame <- function(file, factors) {
  df <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (col in factors) {
    x <- df[[col]]
    df[[col]] <- if (is.numeric(x)) factor(x) else
      factor(x, levels = sort(unique(x), method = "radix"))
  }
  df
}
fmt <- function(x) sprintf("%.15g", x)
clean <- function(x) gsub("[\t\r\n]+", " ", x)
tmb_fixef <- function(f) fixef(f)$cond
tmb_note <- function(f) {
  sprintf("%s (code %d), pdHess %s; nlminb: %d function, %d gradient evaluations", f$fit$message,
          f$fit$convergence, f$sdr$pdHess, f$fit$evaluations[[1]], f$fit$evaluations[[2]])
}
l4_note <- function(f) {
  msgs <- f@optinfo$conv$lme4$messages
  extra <- if (length(msgs)) paste0("; ", paste(msgs, collapse = " | ")) else ""
  paste0("optimizer code ", f@optinfo$conv$opt, "; ", f@optinfo$feval, " deviance evaluations (",
         f@optinfo$optimizer, ", last stage)", extra)
}
run <- function(case, method, fitfun, fixfun, notefun) {
  times <- numeric(0); warns <- character(0)
  tryCatch({
    for (r in seq_len(repeats)) {
      elapsed <- system.time(fit <- withCallingHandlers(fitfun(), warning = function(w) {
        warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning")
      }), gcFirst = TRUE)[["elapsed"]]
      times <- c(times, elapsed)
    }
    fe <- fixfun(fit)
    cat("RESULT", case, method, paste(fmt(times), collapse = ","), fmt(as.numeric(logLik(fit))),
        paste(fmt(fe), collapse = ","), clean(paste(unique(c(notefun(fit), warns)), collapse = " | ")),
        sep = "\t")
    cat("\n")
  }, error = function(e) {
    cat("ERROR", case, method, clean(conditionMessage(e)), sep = "\t"); cat("\n")
  })
}
"""


def lme4_call(ref):
    """lme4's call for a case (R code), or (None, reason) when lme4 has no same objective."""
    family, formula, data = ref["family"], ref["r_formula"], stem(ref["dataset"])
    if family == "negativebinomial":
        return None, (
            "not run: glmer.nb is another objective (dispersion by theta.ml alternating with glmer "
            "fits; Laplace with the expected, not observed, information: logLik 0.18 nats below "
            "glmmTMB's at the optimum)"
        )
    if family == "gaussian":
        if ref["weights"]:
            w = ref["weights"]
            rep = f"{data}[rep(seq_len(nrow({data})), {data}${w}), ]"
            return f"lmer({formula}, data = {rep}, REML = FALSE)", (
                f"lmer on the rows repeated {w} times (lmer's weights are precision weights, another model)"
            )
        return f"lmer({formula}, data = {data}, REML = FALSE)", "lmer, REML = FALSE"
    r_family = "poisson" if family == "poisson" else "binomial"
    return f"glmer({formula}, data = {data}, family = {r_family})", "glmer, defaults (Laplace)"


def r_script(refs, methods):
    lines = [R_HEADER]
    for name in sorted({stem(r["dataset"]) for r in refs}):
        factors = ", ".join(f'"{f}"' for f in R_FACTORS[name])
        lines.append(f'{name} <- read_frame("{name}.csv", c({factors}))')
    for ref in refs:
        if "glmmTMB" in methods:
            lines.append(
                f'run("{ref["name"]}", "glmmTMB", function() {ref["r_command"]}, tmb_fixef, tmb_note)'
            )
        call, _ = lme4_call(ref)
        if "lme4" in methods and call is not None:
            lines.append(f'run("{ref["name"]}", "lme4", function() suppressMessages({call}), fixef, l4_note)')
    return "\n".join(lines) + "\n"


def run_r(refs, methods, repeats, timeout):
    """{(case, method): result} and {(case, method): error} from one Rscript process."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "glmm_peers.R"
        script.write_text(r_script(refs, methods))
        try:
            proc = subprocess.run(
                ["Rscript", str(script), str(DATA_DIR), str(repeats)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {}, {("*", "*"): f"Rscript timed out after {timeout:.0f} s"}
    results, errors = {}, {}
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if parts[0] == "RESULT" and len(parts) >= 7:
            times = [float(t) for t in parts[3].split(",")]
            results[(parts[1], parts[2])] = dict(
                seconds=statistics.median(times),
                times=times,
                loglik=float(parts[4]),
                fixed=[float(v) for v in parts[5].split(",")],
                note=parts[6],
            )
        elif parts[0] == "ERROR":
            errors[(parts[1], parts[2])] = parts[3] if len(parts) > 3 else "error"
    if proc.returncode != 0 and not results:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        errors[("*", "*")] = f"Rscript exit {proc.returncode}: {tail}"
    return results, errors


# ------------------------------------------------------------------ curvi side
def build(ref):
    frame = load_frame(ref["dataset"])
    start = time.perf_counter()
    model = curvi.glmm(ref["formula"], frame, family=ref["family"], weights=ref["weights"])
    return time.perf_counter() - start, model, frame


def timed(fn, cpu=None):
    """Wall seconds of ``fn()``, its result and its warnings; the process's CPU
    seconds are appended to the list ``cpu`` when given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        seconds = time.perf_counter() - start
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return seconds, out, sorted({str(w.message) for w in caught})


def run_curvi(ref, repeat_below):
    build_times, fit_times, cpu_times, notes = [], [], [], []
    while True:
        seconds, model, frame = build(ref)
        build_times.append(seconds)
        seconds, fit, caught = timed(model.fit, cpu_times)  # method "ml", the default
        fit_times.append(seconds)
        notes += [c for c in caught if c not in notes]
        if len(fit_times) >= 3 or fit_times[0] >= repeat_below:
            break
    reference = [fe[1] for fe in ref["fixed_effects"]]
    estimates = list(fit.fixed_effects.values())
    assert len(estimates) == len(reference), (ref["name"], fit.fixed_effects, reference)
    design = model.design
    levels = ", ".join(f"{name} {len(factor.levels)}" for name, factor in design.factors.items())
    return dict(
        rows=len(frame),
        used=design.num_observations,
        levels=levels,
        build=statistics.median(build_times),
        seconds=statistics.median(fit_times),
        times=fit_times,
        cpu=statistics.median(cpu_times),
        evaluations=fit.laplace.num_evaluations,
        iterations=fit.laplace.num_iterations,
        converged=fit.converged,
        dll=fit.log_likelihood - ref["logLik"],
        dbeta=max(abs(a - b) for a, b in zip(estimates, reference)),
        params=sum(p.numel() for p in fit.laplace.params.values()),
        notes=notes,
    )


def run_bayes(ref, nuts_samples, nuts_warmup, nuts_pilot, nuts_limit):
    out = {}
    _, model, _ = build(ref)
    seconds, fit, caught = timed(lambda: model.fit("guide"))
    info = fit.info
    out["guide"] = dict(
        seconds=seconds,
        note=f"{info.num_evaluations} SVI steps, {info.message}"
        + ("; " + "; ".join(caught) if caught else ""),
    )
    print(f"  guide: {seconds:.2f} s ({info.message})", flush=True)
    with CountCalls(marginal_module, "laplace_log_marginal") as counter:
        pilot_s, pilot, _ = timed(lambda: model.fit("nuts", num_samples=nuts_pilot, warmup_steps=nuts_pilot))
    per_iteration = pilot_s / (2 * nuts_pilot)
    predicted = per_iteration * (nuts_samples + nuts_warmup)
    pilot_note = (
        f"pilot {nuts_pilot} + {nuts_pilot}: {pilot_s:.1f} s ({per_iteration * 1e3:.0f} ms per iteration, "
        f"{counter.calls / (2 * nuts_pilot):.1f} Laplace log-marginal evaluations per iteration, "
        f"{pilot_s / max(counter.calls, 1) * 1e3:.0f} ms each; {divergences(pilot)} divergences)"
    )
    print(f"  nuts {pilot_note}; {nuts_samples} + {nuts_warmup} predicted {predicted:.0f} s", flush=True)
    if predicted > nuts_limit:
        out["nuts"] = dict(
            size=f"{nuts_samples} + {nuts_warmup}",
            predicted=predicted,
            pilot_size=f"{nuts_pilot} + {nuts_pilot}",
            pilot_per_iteration=counter.calls / (2 * nuts_pilot),
            seconds=None,
            extrapolated=predicted,
            pilot=pilot_s,
            note=f"measured-too-slow: not run (predicted over the {nuts_limit:.0f} s limit); {pilot_note}; "
            f"EXTRAPOLATED, linearly in iterations, to {nuts_samples} + {nuts_warmup}: ~{predicted:.0f} s",
        )
        return out
    pilot_per_iteration = counter.calls / (2 * nuts_pilot)
    with CountCalls(marginal_module, "laplace_log_marginal") as counter:
        seconds, fit, caught = timed(
            lambda: model.fit("nuts", num_samples=nuts_samples, warmup_steps=nuts_warmup)
        )
    iterations = nuts_samples + nuts_warmup
    out["nuts"] = dict(
        size=f"{nuts_samples} + {nuts_warmup}",
        predicted=predicted,
        pilot_size=f"{nuts_pilot} + {nuts_pilot}",
        pilot_per_iteration=pilot_per_iteration,
        per_iteration=counter.calls / iterations,
        seconds=seconds,
        pilot=pilot_s,
        note=f"{seconds / iterations * 1e3:.0f} ms per iteration, {counter.calls / iterations:.1f} Laplace "
        f"log-marginal evaluations per iteration, {seconds / max(counter.calls, 1) * 1e3:.0f} ms each; "
        f"{divergences(fit)} divergences; {pilot_note}; pilot's linear extrapolation was "
        f"{predicted:.0f} s" + ("; " + "; ".join(caught) if caught else ""),
    )
    print(f"  nuts {nuts_samples} + {nuts_warmup}: {seconds:.1f} s", flush=True)
    return out


class CountCalls:
    """Counts the calls of ``module.name`` (looked up by name at each call) inside the block."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, 0

    def __enter__(self):
        original = getattr(self.module, self.name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self.original = original
        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def divergences(fit):
    mcmc = fit.info
    try:
        diag = mcmc.diagnostics()
        return int(sum(len(v) for v in diag["divergences"].values()))
    except Exception:  # noqa: BLE001 - diagnostics are a nicety
        return "?"


# ------------------------------------------------------------------ profile
PROFILE_PARTS = [
    ("the whole fit (GLMM.fit)", "curvi/glmm.py", "fit"),
    ("  L-BFGS on the Laplace logLik (maximise_laplace)", "curvi/marginal.py", "maximise_laplace"),
    ("  standard errors: central differences of the gradient", "curvi/mle.py", "_covariance"),
    ("  the view of the model (FactorView / ModelView init)", None, "__init__:View"),
    ("Laplace log marginal (laplace_log_marginal), all calls", "curvi/marginal.py", "laplace_log_marginal"),
    ("  one factor: Newton solves of the units' modes", "curvi/modes.py", "solve_modes"),
    ("  one factor: implicit (differentiable) modes", "curvi/modes.py", "implicit_modes"),
    ("  one factor: per-unit Hessians (local_hessian)", "curvi/hessian.py", "local_hessian"),
    ("  several factors: sparse_log_marginal", "curvi/sparse_laplace.py", "sparse_log_marginal"),
    ("    joint Newton solve of the modes", "curvi/sparse_laplace.py", "solve_joint_modes"),
    ("    sparse Hessians (sparse_hessian)", "curvi/sparse_hessian.py", "sparse_hessian"),
    ("the GLMM's model body (ml_model), all runs", "curvi/glmm.py", "ml_model"),
    ("  of which the GLM start values (_glm_start)", "curvi/glmm.py", "_glm_start"),
    ("autograd backward passes (torch.autograd.backward)", "torch/autograd/__init__.py", "backward"),
    ("autograd.grad calls (torch.autograd.grad)", "torch/autograd/__init__.py", "grad"),
]


def profile_fit(ref):
    _, model, _ = build(ref)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    fit = model.fit("ml")
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    rows = []
    for label, path, name in PROFILE_PARTS:
        if name == "__init__:View":
            hits = [
                v
                for k, v in stats.items()
                if k[2] == "__init__" and k[0].endswith(("curvi/factors.py", "curvi/model.py"))
            ]
            # FactorView subclasses ModelView: take the outermost (largest cumulative) one
            hits = sorted(hits, key=lambda v: -v[3])[:1]
        else:
            hits = [v for k, v in stats.items() if k[2] == name and k[0].endswith(path)]
        if hits:
            calls = sum(v[0] for v in hits)  # primitive calls: recursion not double counted
            cum = sum(v[3] for v in hits)
            rows.append(f"| {label} | {calls} | {cum:.3f} | {cum / wall:.0%} |")
    tottime = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    self_rows = []
    for (file, line, name), (_, nc, tt, _, _) in tottime:
        where = file
        for marker in ("site-packages/", "/work/main/"):
            if marker in file:
                where = file.split(marker, 1)[1]
        self_rows.append(f"| `{name}` ({where}:{line}) | {nc} | {tt:.3f} | {tt / wall:.0%} |")
    return dict(
        wall=wall,
        evaluations=fit.laplace.num_evaluations,
        iterations=fit.laplace.num_iterations,
        params=sum(p.numel() for p in fit.laplace.params.values()),
        rows=rows,
        self_rows=self_rows,
        stats=stats,
    )


# ------------------------------------------------------------------ report
def fmt_s(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def main_table(refs, curvi_rows, r_results, r_errors, r_missing):
    lines = [
        "| case | family | n rows | levels | curvi build (s) | curvi fit (s) | glmmTMB (s) | lme4 (s) | "
        "ratio curvi / glmmTMB | ratio curvi / lme4 | ΔlogLik curvi − ref | max \\|Δβ\\| | evaluations | "
        "notes |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for ref in refs:
        c = curvi_rows[ref["name"]]
        cells, notes = {}, []
        for method in ("glmmTMB", "lme4"):
            got = r_results.get((ref["name"], method))
            cells[method] = got["seconds"] if got else None
            if got is None:
                reason = (
                    r_missing.get(method) or r_errors.get((ref["name"], method)) or r_errors.get(("*", "*"))
                )
                if method == "lme4" and lme4_call(ref)[0] is None:
                    reason = lme4_call(ref)[1]
                notes.append(f"{method}: {reason or 'not run'}")
        ratios = [f"{c['seconds'] / cells[m]:.1f}×" if cells[m] else "–" for m in ("glmmTMB", "lme4")]
        runs = "/".join(f"{t:.2f}" for t in c["times"])
        notes.insert(
            0,
            f"curvi runs {runs} s (CPU {c['cpu']:.2f} s); {c['iterations']} L-BFGS iterations"
            + ("" if c["converged"] else "; NOT converged"),
        )
        if c["used"] != c["rows"]:
            notes.append(f"{c['used']} rows used")
        notes += [f"warning: {w}" for w in c["notes"]]
        lines.append(
            f"| {ref['name']} | {ref['family']} | {c['rows']:,} | {c['levels']} | {c['build']:.3f} | "
            f"{fmt_s(c['seconds'])} | {fmt_s(cells['glmmTMB'])} | {fmt_s(cells['lme4'])} | {ratios[0]} | "
            f"{ratios[1]} | {c['dll']:+.1e} | {c['dbeta']:.1e} | {c['evaluations']} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def peer_table(refs, r_results):
    lines = [
        "| case | method | call | runs (s) | ΔlogLik − ref | max \\|Δβ\\| | notes |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for ref in refs:
        beta = [fe[1] for fe in ref["fixed_effects"]]
        for method in ("glmmTMB", "lme4"):
            got = r_results.get((ref["name"], method))
            if got is None:
                continue
            call = "defaults" if method == "glmmTMB" else lme4_call(ref)[1]
            dbeta = max(abs(a - b) for a, b in zip(got["fixed"], beta))
            runs = "/".join(f"{t:.3f}" for t in got["times"])
            note = got["note"].replace("|", "\\|")
            lines.append(
                f"| {ref['name']} | {method} | {call} | {runs} | {got['loglik'] - ref['logLik']:+.1e} | "
                f"{dbeta:.1e} | {note} |"
            )
    return "\n".join(lines)


def bayes_table(bayes, curvi_rows, r_results):
    size = next(iter(bayes.values()))["nuts"]["size"]
    lines = [
        f"| case | ML fit (s) | glmmTMB (s) | guide (s) | NUTS {size} (s) | guide / ML | NUTS / ML | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, parts in bayes.items():
        ml = curvi_rows[name]["seconds"]
        tmb = r_results.get((name, "glmmTMB"))
        g, n = parts["guide"], parts["nuts"]
        nuts_cell = (
            fmt_s(n["seconds"])
            if n["seconds"] is not None
            else f"too slow (~{n['extrapolated']:.0f}, extrapolated)"
        )
        nuts_ratio = f"{n['seconds'] / ml:.1f}×" if n["seconds"] is not None else "–"
        lines.append(
            f"| {name} | {fmt_s(ml)} | {fmt_s(tmb['seconds'] if tmb else None)} | {fmt_s(g['seconds'])} | "
            f"{nuts_cell} | {g['seconds'] / ml:.1f}× | {nuts_ratio} | guide: {g['note']}; NUTS: {n['note']} |"
        )
    return "\n".join(lines)


def reading(refs, curvi_rows, r_results, bayes, profiles):
    parts = [summary(refs, curvi_rows, r_results, profiles)]
    dll = max(abs(c["dll"]) for c in curvi_rows.values())
    dbeta = max(c["dbeta"] for c in curvi_rows.values())
    converged = all(c["converged"] for c in curvi_rows.values())
    parts.append(
        f"Accuracy: on all {len(curvi_rows)} cases curvi's logLik is within {dll:.1e} nats of glmmTMB's "
        f"polished reference and its fixed effects within {dbeta:.1e}; "
        + ("every fit converged." if converged else "NOT every fit converged (see the notes).")
    )
    for method in ("glmmTMB", "lme4"):
        ratios = {
            ref["name"]: curvi_rows[ref["name"]]["seconds"] / r_results[(ref["name"], method)]["seconds"]
            for ref in refs
            if (ref["name"], method) in r_results
        }
        if ratios:
            lo, hi = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
            slower = sum(r > 1 for r in ratios.values())
            parts.append(
                f"Time against {method}: curvi / {method} from {ratios[lo]:.1f}× ({lo}) to {ratios[hi]:.1f}× "
                f"({hi}), median {statistics.median(ratios.values()):.1f}×; curvi is the slower on {slower} "
                f"of {len(ratios)} cases."
            )
    per_eval = {n: c["seconds"] / c["evaluations"] for n, c in curvi_rows.items()}
    by_rows = sorted(curvi_rows, key=lambda n: curvi_rows[n]["used"])
    few, many = by_rows[0], by_rows[-1]
    text = (
        "curvi's fit time per L-BFGS evaluation (fit seconds / evaluations; the standard errors' and the "
        "final check's evaluations are spread over them): "
        + ", ".join(f"{n} {per_eval[n] * 1e3:.0f} ms" for n in by_rows)
        + f" (cases by rows). From {few} ({curvi_rows[few]['used']:,} rows) to {many} "
        f"({curvi_rows[many]['used']:,} rows, {curvi_rows[many]['used'] / curvi_rows[few]['used']:.0f}× "
        f"the rows) it changes {per_eval[many] / per_eval[few]:.1f}×"
    )
    if per_eval[many] / per_eval[few] < 0.25 * curvi_rows[many]["used"] / curvi_rows[few]["used"]:
        text += ": far less than the rows, i.e. an evaluation's time is mostly a fixed cost per call."
    else:
        text += "."
    cpu = max(c["cpu"] / c["seconds"] for c in curvi_rows.values())
    busy = "one thread busy" if cpu < 1.1 else "more than one thread busy at times"
    text += f" CPU time / wall time of curvi's fits is at most {cpu:.2f} ({busy})."
    parts.append(text)
    tmb = {n: r for (n, m), r in r_results.items() if m == "glmmTMB"}
    if tmb:
        seconds = [r["seconds"] for r in tmb.values()]
        used = [c["used"] for c in curvi_rows.values()]
        text = (
            f"glmmTMB's fits take {min(seconds):.2f}–{max(seconds):.2f} s on all of these data sets "
            f"({min(used):,} to {max(used):,} rows): little of it grows with the data either."
        )
        counts = {}
        for name, r in tmb.items():
            found = re.search(r"nlminb: (\d+) function, (\d+) gradient", r["note"])
            if found and name in curvi_rows:
                counts[name] = (curvi_rows[name]["evaluations"], int(found[1]), int(found[2]))
        if counts:
            text += (
                " Evaluations, curvi's L-BFGS (value and gradient together) against nlminb's function / "
                "gradient evaluations: "
                + ", ".join(f"{n} {c} vs {f} / {g}" for n, (c, f, g) in counts.items())
                + "."
            )
            more = [n for n, (c, _, g) in counts.items() if c > g]
            text += (
                f" curvi needs no more evaluations than nlminb's gradient evaluations on "
                f"{len(counts) - len(more)} of {len(counts)} cases"
                + (f" (more on {', '.join(more)})" if more else "")
                + (": elsewhere" if more else ":")
                + " its extra time is the cost of each evaluation, not their number."
            )
        parts.append(text)
    for profile in profiles.values():
        parts.append(profile["reading"])
    for name, b in bayes.items():
        n = b["nuts"]
        if n["seconds"] is not None:
            nuts = (
                f"NUTS {n['size']} {n['seconds']:.0f} s ({n['per_iteration']:.1f} Laplace log-marginal "
                f"evaluations per iteration; the {n['pilot_size']} pilot's linear extrapolation had said "
                f"{n['predicted']:.0f} s, with {n['pilot_per_iteration']:.1f} evaluations per iteration)"
            )
        else:
            nuts = (
                f"NUTS {n['size']} not run: measured too slow, the {n['pilot_size']} pilot took "
                f"{n['pilot']:.0f} s with {n['pilot_per_iteration']:.1f} Laplace log-marginal evaluations "
                "per iteration (long trajectories: that many gradient steps per NUTS iteration), "
                f"EXTRAPOLATED linearly to ~{n['extrapolated']:.0f} s (an estimate, not a measurement: the "
                "trajectories' length changes as the warm-up adapts the step size and mass matrix, so "
                "the full run's could be shorter or longer)"
            )
        parts.append(
            f"{name}, Bayesian: the guide {b['guide']['seconds']:.1f} s, {nuts}, against "
            f"{curvi_rows[name]['seconds']:.2f} s for the ML fit."
        )
    return "\n\n".join(parts)


def summary(refs, curvi_rows, r_results, profiles):
    """The short version: where curvi is slower than glmmTMB, by how much, and why (as measured)."""
    ratios = {
        n: curvi_rows[n]["seconds"] / r_results[(n, "glmmTMB")]["seconds"]
        for n in curvi_rows
        if (n, "glmmTMB") in r_results
    }
    per_eval = [c["seconds"] / c["evaluations"] for c in curvi_rows.values()]
    dll = max(abs(c["dll"]) for c in curvi_rows.values())
    text = f"In short: curvi's fits agree with glmmTMB's reference to {dll:.0e} nats."
    if ratios:
        slower = {n: r for n, r in ratios.items() if r > 1}
        worst = max(ratios, key=ratios.get)
        text += (
            f" Against glmmTMB curvi is slower on {len(slower)} of {len(ratios)} cases, by up to "
            f"{ratios[worst]:.1f}× ({worst}; median {statistics.median(ratios.values()):.1f}×)"
        )
        faster = [n for n, r in ratios.items() if r <= 1]
        text += f", and as fast or faster on {', '.join(faster)}." if faster else "."
    by_rows = sorted(curvi_rows.values(), key=lambda c: c["used"])
    few, many = by_rows[0], by_rows[-1]
    growth = (many["seconds"] / many["evaluations"]) / (few["seconds"] / few["evaluations"])
    text += f" Its time is {min(per_eval) * 1e3:.0f}–{max(per_eval) * 1e3:.0f} ms per L-BFGS evaluation"
    if many["used"] > 4 * few["used"] and growth < 0.25 * many["used"] / few["used"]:
        text += f" ({growth:.1f}× from {few['used']:,} to {many['used']:,} rows): mostly a per-call cost."
    else:
        text += "."
    if profiles:
        shares = []
        for name, p in profiles.items():
            stats = p["stats"]
            cov = sum(
                v[3] for k, v in stats.items() if k[2] == "_covariance" and k[0].endswith("curvi/mle.py")
            )
            body = sum(
                v[0] for k, v in stats.items() if k[2] == "ml_model" and k[0].endswith("curvi/glmm.py")
            )
            marg = sum(
                v[0]
                for k, v in stats.items()
                if k[2] == "laplace_log_marginal" and k[0].endswith("marginal.py")
            )
            shares.append(
                f"{name}: {body / max(marg, 1):.1f} model runs per evaluation, the standard errors "
                f"{cov / p['wall']:.0%} of the fit"
            )
        text += (
            " The profiles show where: each Laplace evaluation runs the Pyro model several times (Newton "
            "steps, Hessians, gradients), and the standard errors, central differences of the gradient "
            "(2 × parameters more evaluations), take a large share of a fit (" + "; ".join(shares) + ")."
        )
    return text


def profile_reading(profile, name):
    stats = profile["stats"]

    def cum(path, fn):
        return sum(v[3] for k, v in stats.items() if k[2] == fn and k[0].endswith(path))

    def calls(path, fn):
        return sum(v[0] for k, v in stats.items() if k[2] == fn and k[0].endswith(path))

    wall, p = profile["wall"], profile["params"]
    lbfgs, cov = cum("curvi/marginal.py", "maximise_laplace"), cum("curvi/mle.py", "_covariance")
    marginal = "curvi/marginal.py", "laplace_log_marginal"
    marg, n_marg = cum(*marginal), calls(*marginal)
    body, n_body = cum("curvi/glmm.py", "ml_model"), calls("curvi/glmm.py", "ml_model")
    engine = sum(
        v[2] for k, v in stats.items() if k[2] == "<method 'run_backward' of 'torch._C._EngineBase' objects>"
    )
    return (
        f"Profile of {name}'s ML fit (cProfile, after the warm-up; {wall:.2f} s under the profiler, "
        f"{profile['evaluations']} L-BFGS evaluations in {profile['iterations']} iterations, "
        f"{p} parameters): L-BFGS {lbfgs:.2f} s ({lbfgs / wall:.0%}); the standard errors {cov:.2f} s "
        f"({cov / wall:.0%}: central "
        f"differences of the gradient, 2 × {p} more log-marginal evaluations with gradients). "
        f"laplace_log_marginal ran {n_marg} times, {marg / max(n_marg, 1) * 1e3:.1f} ms a call; inside, the "
        f"model's body ran {n_body} times ({n_body / max(n_marg, 1):.1f} per log-marginal call: Newton "
        f"steps, line searches, Hessians, gradients, each a fresh Pyro trace), {body:.2f} s "
        f"({body / wall:.0%} of the "
        f"fit), and autograd's engine took {engine:.2f} s ({engine / wall:.0%}) of its own time."
    )


# ------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [r["name"] for r in glmm_references()]
    parser.add_argument("--cases", nargs="*", default=names, choices=names)
    parser.add_argument("--bayes", nargs="*", default=list(BAYES_CASES), choices=[*names, "none"])
    parser.add_argument(
        "--profile", nargs="*", default=list(PROFILE_CASES), choices=[*names, "none"], help="cases to profile"
    )
    parser.add_argument(
        "--repeat-below", type=float, default=10.0, help="3 runs (median) when the first is faster (s)"
    )
    parser.add_argument("--r-repeats", type=int, default=3)
    parser.add_argument("--nuts-samples", type=int, default=500)
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument(
        "--nuts-pilot", type=int, default=100, help="pilot run: this many samples and warm-up steps"
    )
    parser.add_argument(
        "--nuts-limit", type=float, default=600.0, help="skip the full NUTS run predicted to be slower (s)"
    )
    parser.add_argument("--r-timeout", type=float, default=1800.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (R runs on one)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_start, revision = time.perf_counter(), load_average(), curvi_revision()
    refs = [r for r in glmm_references() if r["name"] in args.cases]
    by_name = {r["name"]: r for r in glmm_references()}
    loads = {}

    # curvi: warm-up, then each case
    print(f"warm-up: {WARM_UP_CASE} ...", flush=True)
    warm_s, _, _ = timed(lambda: build(by_name[WARM_UP_CASE])[1].fit("ml"))
    print(f"  {warm_s:.2f} s", flush=True)
    curvi_rows = {}
    for ref in refs:
        print(f"curvi {ref['name']} ...", end=" ", flush=True)
        curvi_rows[ref["name"]] = row = run_curvi(ref, args.repeat_below)
        loads[ref["name"]] = load_average()
        print(
            f"{row['seconds']:.2f} s (runs {', '.join(f'{t:.2f}' for t in row['times'])}), "
            f"{row['evaluations']} evaluations, ΔlogLik {row['dll']:+.1e}, max |Δβ| {row['dbeta']:.1e}",
            flush=True,
        )

    # R peers, one process
    r_version, r_missing = r_probe()
    methods = [m for m in ("glmmTMB", "lme4") if r_missing[m] is None]
    for m in ("glmmTMB", "lme4"):
        if r_missing[m]:
            print(f"[{m}] skipped: {r_missing[m]}", flush=True)
    r_results, r_errors = {}, {}
    if methods:
        print(f"R ({r_version}): {', '.join(methods)} on {len(refs)} cases ...", flush=True)
        load_r = load_average()
        r_start = time.perf_counter()
        r_results, r_errors = run_r(refs, methods, args.r_repeats, args.r_timeout)
        print(f"  {time.perf_counter() - r_start:.1f} s; errors: {r_errors or 'none'}", flush=True)
        loads["R"] = f"{load_r} → {load_average()}"

    # Bayesian paths
    bayes = {}
    for name in [n for n in args.bayes if n != "none"]:
        if name not in curvi_rows:
            continue
        print(f"Bayesian paths, {name}:", flush=True)
        bayes[name] = run_bayes(
            by_name[name], args.nuts_samples, args.nuts_warmup, args.nuts_pilot, args.nuts_limit
        )
        loads[f"{name} Bayesian"] = load_average()

    profiles = {}
    for name in [n for n in args.profile if n != "none"]:
        print(f"profile: {name} ...", flush=True)
        profiles[name] = profile_fit(by_name[name])
        profiles[name]["reading"] = profile_reading(profiles[name], name)
        loads[f"profile {name}"] = load_average()
    total = time.perf_counter() - started

    command = "python benchmarks/glmm.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    text = (
        '# The formula front end: `curvi.glmm(...).fit("ml")` against glmmTMB and lme4\n\n'
        f"Machine: {os.cpu_count()} cores ({cpu_name()}), Python {platform.python_version()}, "
        f"torch {torch.__version__} ({args.threads} thread{'s' if args.threads > 1 else ''}; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}), "
        f"pyro {pyro.__version__}; {r_version or 'R not available'} (R single-threaded, reference BLAS); "
        f"{revision}; "
        f"{datetime.date.today().isoformat()}; float64. Command: `{command}` "
        f"(whole run {total / 60:.1f} min; "
        f"load average 1/5/15 min {load_start} at the start, {load_average()} at the end; after each step: "
        + "; ".join(f"{k} {v}" for k, v in loads.items())
        + ". The machine is shared: "
        + (
            f"the 1-minute load reached {max(LOAD_SEEN):.2f}, above the {os.cpu_count()} cores, so the "
            "times are inflated, curvi's and R's alike; the ratios, measured in the same run minutes apart, "
            "are the part to read"
            if max(LOAD_SEEN) > (os.cpu_count() or 1)
            else f"the 1-minute load stayed at or below {max(LOAD_SEEN):.2f}, under the {os.cpu_count()} "
            "cores"
        )
        + ". The script pins OpenBLAS to one thread: with its default, a thread per core, the several-factor "
        "fits (which call scipy) ran 2–3× slower and erratically on this shared machine in a check outside "
        "this run.)\n\n"
        "The ten cases of `curvi.datasets.glmm_references()` (glmmTMB's polished fits made by "
        "`benchmarks/reference/glmm.R`). curvi: `curvi.glmm(formula, load_frame(dataset), family=..., "
        'weights=...)` (build: formula and design tensors) then `.fit("ml")` (Laplace ML by `laplace_mle`, '
        "default options, standard errors included), after one warm-up fit of "
        f"{WARM_UP_CASE} ({warm_s:.2f} s: imports and first-call set-up); median of 3 runs when the first "
        "took "
        f"under {args.repeat_below:.0f} s, else one run. glmmTMB: the reference's `r_command` (defaults, "
        "`sdreport` included); lme4: `lmer(..., REML = FALSE)` or `glmer(...)` with lme4's defaults; "
        "both timed "
        f"inside one Rscript process by `system.time` (median of {args.r_repeats}; start-up, package loading "
        "and reading the CSVs excluded). ratio = curvi's fit seconds / the peer's. ΔlogLik and max |Δβ| "
        "(fixed "
        "effects) are curvi's against the reference; evaluations = `fit.laplace.num_evaluations` (L-BFGS's "
        "evaluations of the Laplace logLik with its gradient; the final check and the standard errors' "
        "2 × (number of parameters) gradient evaluations come on top).\n\n"
        + main_table(refs, curvi_rows, r_results, r_errors, r_missing)
        + "\n"
    )
    if r_results:
        text += "\n## The peers' own fits against the reference\n\n" + peer_table(refs, r_results) + "\n"
    if bayes:
        text += (
            "\n## The Bayesian paths\n\n"
            'Wall time of `fit("guide")` (default options: the amortized Laplace guide, up to 3000 steps, '
            f'1000 draws) and of `fit("nuts", num_samples={args.nuts_samples}, '
            f"warmup_steps={args.nuts_warmup})` "
            "(NUTS on the Laplace marginal of the globals, the units drawn from their Laplace conditional), "
            f"one run each, after a {args.nuts_pilot} + {args.nuts_pilot} NUTS pilot (the full run is made "
            f"only when the pilot's linear extrapolation stays under {args.nuts_limit:.0f} s). ML fit and "
            "glmmTMB from the "
            "table above.\n\n" + bayes_table(bayes, curvi_rows, r_results) + "\n"
        )
    for name, profile in profiles.items():
        text += (
            f"\n## Where an ML fit's time goes ({name}, cProfile)\n\n"
            f'One `fit("ml")` under cProfile after the warm-up: {profile["wall"]:.2f} s wall (the profiler '
            "adds overhead to every Python call, so these are inflated; the shares are what to read). "
            "Cumulative times of selected functions (nested: the indented rows are inside the row above):\n\n"
            "| part | calls | cumulative (s) | share of the fit |\n|---|---:|---:|---:|\n"
            + "\n".join(profile["rows"])
            + "\n\nThe 12 functions with the most time of their own:\n\n"
            "| function | calls | own time (s) | share |\n|---|---:|---:|---:|\n"
            + "\n".join(profile["self_rows"])
            + "\n"
        )
    text += "\n## Reading\n\n" + reading(refs, curvi_rows, r_results, bayes, profiles) + "\n"
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
