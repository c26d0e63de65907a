"""Benchmark: time to a converged ELBO, and accuracy, of curvi's Laplace guides
against Pyro's autoguides on a hierarchical logistic model.

Model and data (``benchmarks/common.py``): 4 globals (intercept and slope,
the two random-effect sds), a random intercept and slope per group, 10
Bernoulli observations per group, ``simulate(N, seed=0)``; 1 000 and 10 000
groups. Guides, each trained with Adam through ``curvi.fit`` (single-particle
``Trace_ELBO``) for a wall-clock budget or until its ELBO stops improving
(except the default fit, which stops by itself):

* ``AmortizedLaplaceGuide`` and ``LaplaceGuide`` (curvi);
* what a user gets with no options: ``AmortizedLaplaceGuide`` fitted by
  ``curvi.fit(model, guide, *data)`` with no ``optim``/``loss``/``steps`` (its
  sample-average Newton, ``curvi.LaplaceNewton``, which stops by itself: one
  run, no learning rate, the budget only a cap; its final ELBO is the state
  the fit returns, not the best point), with the default
  ``global_precision="joint"`` and with ``"marginal"`` (rows "..., default fit");
* Pyro's ``AutoNormal``, ``AutoMultivariateNormal`` (skipped where its dense
  ``scale_tril`` would not fit in ``--memory-gb``) and
  ``AutoLaplaceApproximation`` (MAP by Adam, then ``laplace_approximation()``
  with its dense Hessian; skipped where that Hessian, extrapolated from
  ``results/hessian.md``, would take longer than the budget).

Every few seconds of training (times growing geometrically, capped at
budget / 20 apart) the clock is paused, the guide's state is kept and its
ELBO estimated: the mean of chunks of ``Trace_ELBO(num_particles=K,
vectorize_particles=True)`` (K bounded for memory), as many chunks as it
takes for the standard error from the chunk means to reach
``--se-trajectory`` (1 nat). From each trajectory: the final ELBO (the best
point re-evaluated independently to ``--se``, 0.2 nat), the time to within 1
nat of it, and the time to within 1 nat of the amortized guide's final ELBO
-- every point near one of those levels is refined to ``--se`` before it is
judged, so the reported times rest on 0.2-nat estimates while the tens of
thousands of particles a 0.2-nat estimate of a mean-field guide needs at 10 000
groups are spent only where they decide something. Pyro's guides are run
with each learning rate of ``--lrs-pyro`` and curvi's with each of
``--lrs-curvi``; the better run is reported.

Accuracy: at 1 000 groups the global posterior (means and sds of beta and
sigma) of each guide, from draws of ``Predictive``, against a long NumPyro
NUTS run of the non-centred model, cached in
``benchmarks/reference/nuts_1000.npz`` (+ ``.json``: how it was made, R-hat,
ESS) and rebuilt with ``--regenerate-nuts``.

Each (guide, learning rate, N) runs in its own process; its progress goes to
stderr as it runs.

Usage::

    python benchmarks/guides.py                   # full table -> benchmarks/results/guides.md
    python benchmarks/guides.py --quick           # 1 000 groups, short budgets, printed only
    python benchmarks/guides.py --budgets 60 150 --lrs-curvi 0.01 --threads 1 --final-seconds 120
                                                  # the committed table (its command is in its header)
    python benchmarks/guides.py --regenerate-nuts # recompute the NUTS reference first
    python benchmarks/guides.py --budgets 60 150 --lrs-curvi 0.01 --threads 1 --final-seconds 120 \
        --eval-seconds 15 --guides amortized-default amortized-default-marginal --merge
                                                  # re-run only these rows, merged into the table

``--guides`` takes short names (see ``--help``). With ``--merge`` only those
guides run, and their rows replace (or join) theirs in the existing results
file (``--out``, default ``results/guides.md``): the speed rows' Δ vs amortized
use the file's AmortizedLaplaceGuide ELBO, the default-fit lines of Targets
are replaced, and a note after the header's command says which rows came from
which run (date, machine, checkout, command). Without ``--merge``, a subset
runs with AmortizedLaplaceGuide added and is written only to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OBS_PER_GROUP, numpyro_model_noncentred, simulate, torch_model  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "guides.md"
HESSIAN_RESULTS = HERE / "results" / "hessian.md"
REFERENCE_DIR = HERE / "reference"
AMORTIZED = "AmortizedLaplaceGuide"
AMORTIZED_MARGINAL = "AmortizedLaplaceGuide(global_precision='marginal')"
# what a user gets with no options: curvi.fit(model, guide, *data), sample-average Newton
AMORTIZED_DEFAULT = "AmortizedLaplaceGuide, default fit (`curvi.fit` with no options)"
AMORTIZED_DEFAULT_MARGINAL = "AmortizedLaplaceGuide(global_precision='marginal'), default fit"
DEFAULT_FIT_GUIDES = [AMORTIZED_DEFAULT, AMORTIZED_DEFAULT_MARGINAL]
CURVI_GUIDES = [AMORTIZED, AMORTIZED_MARGINAL, "LaplaceGuide"]  # trained with Adam
PYRO_GUIDES = ["AutoNormal", "AutoMultivariateNormal", "AutoLaplaceApproximation"]
# table order; AMORTIZED runs first (the others' target is its ELBO)
GUIDES = [AMORTIZED, *DEFAULT_FIT_GUIDES, AMORTIZED_MARGINAL, "LaplaceGuide", *PYRO_GUIDES]
# short names for --guides (the full names are accepted too)
GUIDE_KEYS = {
    "amortized": AMORTIZED,
    "amortized-default": AMORTIZED_DEFAULT,
    "amortized-default-marginal": AMORTIZED_DEFAULT_MARGINAL,
    "amortized-marginal": AMORTIZED_MARGINAL,
    "laplace": "LaplaceGuide",
    "autonormal": "AutoNormal",
    "automvn": "AutoMultivariateNormal",
    "autolaplace": "AutoLaplaceApproximation",
}
GLOBALS = ["beta[0]", "beta[1]", "sigma[0]", "sigma[1]"]
SIZES, BUDGETS = [1000, 10_000], [120.0, 300.0]
REFERENCE_N = 1000
NUTS_DEFAULTS = {"chains": 2, "warmup": 2000, "samples": 10_000, "seed": 0}


def dimension(n):
    return 4 + 2 * n


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# =====================================================================
# worker: one guide, one learning rate, one N
# =====================================================================
def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_guide(name, model):
    from pyro.infer.autoguide import (
        AutoLaplaceApproximation,
        AutoMultivariateNormal,
        AutoNormal,
    )

    from curvi import AmortizedLaplaceGuide, LaplaceGuide

    if name in (AMORTIZED, AMORTIZED_DEFAULT):
        return AmortizedLaplaceGuide(model, unit_plate="groups")
    if name in (AMORTIZED_MARGINAL, AMORTIZED_DEFAULT_MARGINAL):
        return AmortizedLaplaceGuide(model, unit_plate="groups", global_precision="marginal")
    if name == "LaplaceGuide":
        return LaplaceGuide(model, unit_plate="groups")
    return {
        "AutoNormal": AutoNormal,
        "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoLaplaceApproximation": AutoLaplaceApproximation,
    }[name](model)


class Estimate:
    """A precise-ELBO estimate: chunk means of ``Trace_ELBO(num_particles=K,
    vectorize_particles=True)``, refined by adding chunks."""

    def __init__(self, chunk):
        self.chunk, self.means, self.seconds = chunk, [], 0.0

    @property
    def mean(self):
        return statistics.fmean(self.means) if self.means else math.nan

    @property
    def se(self):
        if len(self.means) < 2:
            return math.inf
        return statistics.stdev(self.means) / math.sqrt(len(self.means))

    @property
    def particles(self):
        return self.chunk * len(self.means)

    def __str__(self):
        return f"ELBO {self.mean:14.3f} ± {self.se:.3f}  ({self.particles:,} particles, {self.seconds:.1f} s)"


class PreciseELBO:
    """Evaluates a guide's ELBO in chunks of particles (memory bounded by
    ``--chunk-elements``) until the standard error of the chunk means reaches a
    target, or a particle / time cap."""

    def __init__(self, model, data, args, num_groups):
        from pyro.infer import Trace_ELBO

        self.model, self.data, self.args = model, data, args
        self.chunk = max(1, int(args.chunk_elements // (num_groups * OBS_PER_GROUP)))
        self.loss = Trace_ELBO(num_particles=self.chunk, vectorize_particles=True, max_plate_nesting=2)

    def __call__(self, guide, se, seconds, estimate=None):
        """Add chunks to ``estimate`` (a new one by default) until its SE is ≤ ``se``
        (after at least ``--min-chunks``) or ``seconds`` or ``--max-particles``."""
        import torch

        est = Estimate(self.chunk) if estimate is None else estimate
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while True:
                value = -self.loss.loss(self.model, guide, *self.data)
                if not math.isfinite(value):
                    raise FloatingPointError(f"non-finite ELBO estimate {value}")
                if value > 0:  # ELBO ≤ log p(y) ≤ 0 for Bernoulli data
                    raise FloatingPointError(
                        f"ELBO estimate {value:.3g} > 0 (impossible for Bernoulli data): numerical breakdown"
                    )
                est.means.append(value)
                if len(est.means) >= self.args.min_chunks and (
                    est.se <= se
                    or est.particles >= self.args.max_particles
                    or time.perf_counter() - start >= seconds
                ):
                    break
        est.seconds += time.perf_counter() - start
        return est


class MapObjective:
    """The (deterministic) objective of a Delta guide: log p at its point, with
    the Jacobian of the unconstraining transforms."""

    def __init__(self, model, data):
        from pyro.infer import Trace_ELBO

        self.model, self.data, self.loss = model, data, Trace_ELBO(max_plate_nesting=2)

    def __call__(self, guide, se=None, seconds=None, estimate=None):
        import torch

        est = Estimate(1)
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = -self.loss.loss(self.model, guide, *self.data)
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite MAP objective {value}")
        est.means = [value, value]  # exact: se 0
        est.seconds = time.perf_counter() - start
        return est


def snapshot(guide):
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


def restore(guide, state):
    import torch

    with torch.no_grad():
        for k, v in guide.state_dict().items():
            v.copy_(state[k])  # in place: the param store holds the same tensors


def train(label, model, guide, data, lr, budget, evaluate, args, default_fit=False):
    """Adam through ``curvi.fit`` for ``budget`` seconds of training (the
    evaluations excluded) or until the ELBO stops improving; with
    ``default_fit``, ``curvi.fit(model, guide, *data)`` with no optimiser,
    loss or steps (the guide's sample-average Newton, which stops by itself;
    ``budget`` is only a cap).

    At each evaluation point the clock stops, the guide's state is kept and its
    ELBO estimated to ``--se-trajectory``. Returns a dict: ``points`` (train
    seconds, steps, Estimate, state), steps, train seconds, and an error
    message if the fit failed (the points up to then are kept); with
    ``default_fit`` also the fit's own account (``fit_*``, ``theta_se``),
    ``fit_seconds`` being None unless the fit returned by itself.
    """
    import pyro
    from pyro.infer import Trace_ELBO

    from curvi import fit

    state = {"clock": 0.0, "next": 0.0, "steps": 0, "points": [], "eval_seconds": 0.0}
    max_gap = args.eval_every if args.eval_every else budget / 20

    def stop_rule():
        """The best estimate gained < ``stop_tol`` over the second half of the
        training time so far."""
        points = state["points"]
        if len(points) < 6:
            return False
        t = points[-1][0]
        before = [p[2].mean for p in points if p[0] <= t / 2]
        return bool(before) and max(p[2].mean for p in points) - max(before) < args.stop_tol

    def callback(step, _elbo):
        now = time.perf_counter()
        state["clock"] += now - state["resumed"]
        state["steps"] = step
        stop = False
        if state["clock"] >= state["next"] or state["clock"] >= budget:
            t = state["clock"]
            kept = snapshot(guide) if default_fit else None
            est = evaluate(guide, args.se_trajectory, args.eval_seconds)
            if default_fit:
                # leave the fit as it was: an evaluation at a new θ̂ recomputes the
                # 'marginal' curvature (a new epoch for LaplaceNewton's line
                # search) and moves the units' warm starts
                restore(guide, kept)
            state["eval_seconds"] += est.seconds
            state["points"].append((t, step, est, kept if default_fit else snapshot(guide)))
            log(f"  [{label}] t = {t:7.2f} s  step {step:>7,}  {est}")
            state["next"] = t + min(max(t * (args.eval_growth - 1), args.eval_min_gap), max_gap)
            stop = t >= budget or (not default_fit and stop_rule())
        state["resumed"] = time.perf_counter()
        return stop

    error, extra = None, {}
    state["resumed"] = time.perf_counter()
    try:
        if default_fit:
            result = fit(model, guide, *data, progress=False, callback=callback)
            returned = time.perf_counter()
            extra = {
                "fit_message": result.message,
                "fit_converged": result.converged,
                "fit_elbo": result.final_elbo,
                "fit_elbo_se": result.final_elbo_se,
                "theta_se": result.info.get("theta_se"),
                "fit_seconds": None,
            }
            state["steps"] = result.num_evaluations
            if result.info.get("theta") is not None:  # stopped by itself, not by the budget
                state["clock"] += returned - state["resumed"]  # its bookkeeping after the last step
                extra["fit_seconds"] = state["clock"]
        else:
            fit(
                model,
                guide,
                *data,
                steps=10**12,
                optim=pyro.optim.Adam({"lr": lr}),
                loss=Trace_ELBO(),
                tol=None,
                progress=False,
                callback=callback,
            )
    except Exception as exc:  # a diverged fit: keep the points so far
        error = _error_text(exc)
        log(f"  [{label}] failed after step {state['steps']}: {error}")
    return {
        "points": state["points"],
        "steps": state["steps"],
        "train_seconds": state["clock"],
        "error": error,
        "eval_seconds": state["eval_seconds"],
        **extra,
    }


def first_reaching(points, level, guide, evaluate, args, label):
    """Training seconds of the first point whose ELBO is ≥ ``level`` (None:
    never). A point's estimate is refined to ``--se`` before it is judged
    when it lies within 3 standard errors of ``level``."""
    for t, _, est, state in points:
        if abs(est.mean - level) <= 3 * est.se and est.se > args.se:
            restore(guide, state)
            try:
                evaluate(guide, args.se, args.final_seconds, estimate=est)
            except FloatingPointError as exc:
                log(f"  [{label}] refining t = {t:7.2f} s failed ({exc}): counted as below")
                continue
            log(f"  [{label}] refined t = {t:7.2f} s: {est} (vs level {level:.3f})")
        if est.mean >= level:
            return t
    return None


def draw_globals(model, guide, data, num_draws, chunk):
    """Means and sds of the 4 globals from ``num_draws`` draws of the guide."""
    import numpy as np
    import torch
    from pyro.infer import Predictive

    draws = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while sum(len(d) for d in draws) < num_draws:
            predictive = Predictive(
                model, guide=guide, num_samples=chunk, parallel=True, return_sites=["beta", "sigma"]
            )
            out = predictive(*data)
            draws.append(
                torch.cat([out["beta"].reshape(chunk, 2), out["sigma"].reshape(chunk, 2)], -1)
                .double()
                .numpy()
            )
    draws = np.concatenate(draws)
    return {"mean": draws.mean(0).tolist(), "sd": draws.std(0, ddof=1).tolist(), "draws": len(draws)}


def prefault(gb):
    """Touch ``gb`` of heap once before the clock starts. In this benchmark's VMs
    the first touch of a page costs ~2.5 s/GB (later touches ~0.1 s/GB); with
    the worker's glibc settings the pages stay in the process for reuse."""
    import torch

    blocks = [torch.ones(4 * 2**20) for _ in range(int(gb * 2**30 / (16 * 2**20)))]  # 16 MB
    del blocks


def _error_text(exc):
    """A short account of an exception for the table."""
    text = (str(exc).splitlines() or [""])[0]
    bad = re.match(r"Expected parameter (\w+) .* but found invalid values", text)
    if bad:  # a distribution built from NaN parameters
        return f"{type(exc).__name__}: invalid (NaN) {bad.group(1)} of a distribution"
    if "not positive-definite" in text:
        return f"{type(exc).__name__}: {text.split(':')[0]}: not positive-definite"
    return f"{type(exc).__name__}: {text[:90]}"


def work(guide_name, num_groups, lr, budget, args):
    import pyro
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    prefault(args.prefault_gb)
    pool_mb = _peak_mb()
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    x, y, *_ = simulate(num_groups, seed=0)
    data = (torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype))
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    label = f"{guide_name}{f' lr={lr}' if lr is not None else ''} N={num_groups:,}"
    guide = make_guide(guide_name, torch_model)
    precise = PreciseELBO(torch_model, data, args, num_groups)
    out = {
        "guide": guide_name,
        "lr": lr,
        "n": num_groups,
        "budget": budget,
        "notes": [],
        "error": None,
        "final_elbo": None,
        "pool_mb": pool_mb,
    }

    def final_estimate(g):
        est = precise(g, args.se, args.final_seconds)
        out.update(final_elbo=est.mean, final_se=est.se, final_particles=est.particles)
        return est

    if guide_name == "AutoLaplaceApproximation":
        run = train(
            label + " MAP", torch_model, guide, data, lr, budget, MapObjective(torch_model, data), args
        )
        points = run["points"]
        out.update(
            steps=run["steps"],
            train_seconds=run["train_seconds"],
            map_error=run["error"],
            map_trajectory=[(t, s, e.mean) for t, s, e, _ in points],
        )
        if not points:
            out["error"] = f"MAP failed: {run['error']}"
            out["peak_mb"] = _peak_mb()
            return out
        best = max(points, key=lambda p: p[2].mean)
        restore(guide, best[3])
        out["map_objective"] = best[2].mean
        out["map_converge_seconds"] = next(t for t, _, e, _ in points if e.mean >= best[2].mean - 1)
        out["map_seconds"] = best[0]
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                guide = guide.laplace_approximation(*data)
        except Exception as exc:
            out["hessian_seconds"] = time.perf_counter() - start
            out["error"] = f"laplace_approximation() raised {_error_text(exc)}"
            log(f"  [{label}] {out['error']} after {out['hessian_seconds']:.1f} s")
            out["peak_mb"] = _peak_mb()
            return out
        out["hessian_seconds"] = time.perf_counter() - start
        bad = int((~torch.isfinite(guide.scale)).sum())
        if bad:
            out["notes"].append(f"{bad} non-finite marginal sds (Hessian not negative definite)")
        try:
            est = final_estimate(guide)
        except Exception as exc:
            out["error"] = f"ELBO of the Laplace approximation: {_error_text(exc)}"
            out["peak_mb"] = _peak_mb()
            return out
        ready = out["map_converge_seconds"] + out["hessian_seconds"]
        log(
            f"  [{label}] MAP {best[0]:.1f} s (within 1 nat at {out['map_converge_seconds']:.1f} s) "
            f"+ Hessian {out['hessian_seconds']:.1f} s: {est}"
        )
        out["trajectory"] = [(ready, run["steps"], est.mean, est.se)]
        out["converge_seconds"] = ready
        if args.target_elbo is not None:
            out["reach_target_seconds"] = ready if est.mean >= args.target_elbo - 1 else None
    else:
        default_fit = guide_name in DEFAULT_FIT_GUIDES
        run = train(label, torch_model, guide, data, lr, budget, precise, args, default_fit=default_fit)
        points = run["points"]
        out.update(
            steps=run["steps"],
            train_seconds=run["train_seconds"],
            error=run["error"],
            eval_seconds=run["eval_seconds"],
        )
        out.update({k: v for k, v in run.items() if k.startswith("fit_") or k == "theta_se"})
        # the default fit stops by itself: what the user gets is the state it
        # returns (the blocks' average θ̂), not the best point of the trajectory
        returned = default_fit and run.get("fit_seconds") is not None and run["error"] is None
        if not points and not returned:
            out["peak_mb"] = _peak_mb()
            return out
        if returned:
            final_state, where = snapshot(guide), f"the fit's final state, t = {run['fit_seconds']:.2f} s"
        else:
            best = max(points, key=lambda p: p[2].mean)
            final_state, where = best[3], f"best point, t = {best[0]:.2f} s"
        restore(guide, final_state)
        try:
            est = final_estimate(guide)
        except FloatingPointError as exc:
            out["error"] = f"final ELBO: {exc}"
            out["peak_mb"] = _peak_mb()
            return out
        if returned:  # the final state is the trajectory's last point
            point = (run["fit_seconds"], run["steps"], est, final_state)
            if points and points[-1][1] == run["steps"]:
                points[-1] = point
            else:
                points.append(point)
        log(f"  [{label}] final ({where}, re-evaluated): {est}")
        out["converge_seconds"] = first_reaching(points, est.mean - 1, guide, precise, args, label)
        if args.target_elbo is not None:
            out["reach_target_seconds"] = first_reaching(
                points, args.target_elbo - 1, guide, precise, args, label
            )
        out["trajectory"] = [(t, s, e.mean, e.se) for t, s, e, _ in points]
        restore(guide, final_state)
        if guide_name in CURVI_GUIDES or default_fit:  # was the precision at the final point repaired?
            try:
                out["repair"] = str(guide.laplace_posterior(*data).precision.report)
            except Exception as exc:
                out["repair"] = f"get_posterior raised {_error_text(exc)}"

    if args.accuracy:
        try:
            out["globals"] = draw_globals(torch_model, guide, data, args.draws, precise.chunk)
        except Exception as exc:
            out["notes"].append(f"draws failed: {_error_text(exc)}")
    out["peak_mb"] = _peak_mb()
    return out


def worker(argv, args):
    guide_name, n, budget = argv[0], int(argv[1]), float(argv[3])
    lr = None if guide_name in DEFAULT_FIT_GUIDES else float(argv[2])  # one run: no learning rate
    out = work(guide_name, n, lr, budget, args)
    print(json.dumps(out))


# =====================================================================
# NUTS reference
# =====================================================================
def data_fingerprint(num_groups):
    x, y, *_ = simulate(num_groups, seed=0)
    h = hashlib.sha256()
    for a in (x, y):
        h.update(a.astype("float64").tobytes())
    return h.hexdigest()[:16]


def reference_paths(num_groups):
    return REFERENCE_DIR / f"nuts_{num_groups}.npz", REFERENCE_DIR / f"nuts_{num_groups}.json"


def nuts_worker(num_groups, args):
    """Run NUTS on the non-centred NumPyro model; write the draws and a note."""
    import numpyro

    numpyro.set_host_device_count(args.nuts_chains)
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from numpyro.diagnostics import summary
    from numpyro.infer import MCMC, NUTS

    x, y, *_ = simulate(num_groups, seed=0)
    mcmc = MCMC(
        NUTS(numpyro_model_noncentred),
        num_warmup=args.nuts_warmup,
        num_samples=args.nuts_samples,
        num_chains=args.nuts_chains,
        chain_method="parallel",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.nuts_seed), x, y, extra_fields=("diverging", "num_steps"))
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    seconds = time.perf_counter() - start
    beta, sigma = np.asarray(samples["beta"]), np.asarray(samples["sigma"])  # (C, S, 2)
    draws = np.concatenate([beta, sigma], -1)  # (C, S, 4)
    diag = summary({"g": draws}, group_by_chain=True)["g"]
    extra = mcmc.get_extra_fields(group_by_chain=True)
    flat = draws.reshape(-1, 4)
    npz, note = reference_paths(num_groups)
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, draws=draws.astype(np.float32), names=np.array(GLOBALS))
    info = {
        "what": "NUTS draws of (beta[0], beta[1], sigma[0], sigma[1]), shape (chains, draws, 4), float32",
        "model": "benchmarks/common.py: numpyro_model_noncentred (u = sigma * z, z ~ Normal(0, 1))",
        "data": f"simulate({num_groups}, seed=0)",
        "data_sha256_16": data_fingerprint(num_groups),
        "chains": args.nuts_chains,
        "warmup": args.nuts_warmup,
        "samples": args.nuts_samples,
        "seed": args.nuts_seed,
        "x64": True,
        "seconds": round(seconds, 1),
        "divergences": int(np.asarray(extra["diverging"]).sum()),
        "mean_leapfrog_steps": float(np.asarray(extra["num_steps"]).mean()),
        "mean": flat.mean(0).tolist(),
        "sd": flat.std(0, ddof=1).tolist(),
        "r_hat": np.asarray(diag["r_hat"]).tolist(),
        "ess": np.asarray(diag["n_eff"]).tolist(),
        "numpyro": numpyro.__version__,
        "jax": jax.__version__,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/guides.py --regenerate-nuts",
    }
    note.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"ok": True}))


def load_reference(num_groups, args):
    """(info, message): the cached NUTS reference, regenerated when asked."""
    npz, note = reference_paths(num_groups)
    if args.regenerate_nuts or not npz.exists():
        try:
            import jax  # noqa: F401
            import numpyro  # noqa: F401
        except ImportError:
            why = "regeneration asked for" if args.regenerate_nuts else "no cached reference"
            return None, (
                f"accuracy skipped: {why} but numpyro/jax are not installed (pip install jax numpyro)"
            )
        log(
            f"NUTS reference at N = {num_groups:,}: {args.nuts_chains} chains × "
            f"({args.nuts_warmup:,} warm-up + {args.nuts_samples:,} draws) ..."
        )
        cmd = [
            sys.executable,
            __file__,
            "--nuts-worker",
            str(num_groups),
            "--nuts-chains",
            str(args.nuts_chains),
            "--nuts-warmup",
            str(args.nuts_warmup),
            "--nuts-samples",
            str(args.nuts_samples),
            "--nuts-seed",
            str(args.nuts_seed),
        ]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            return None, f"accuracy skipped: the NUTS run failed (exit code {proc.returncode})"
    import numpy as np

    info = json.loads(note.read_text())
    if info.get("data_sha256_16") != data_fingerprint(num_groups):
        return None, (
            f"accuracy skipped: {npz.name} was made from other data than "
            f"simulate({num_groups}, seed=0); rerun with --regenerate-nuts"
        )
    draws = np.load(npz)["draws"].astype(np.float64).reshape(-1, 4)
    info["mean_check"], info["sd_check"] = draws.mean(0).tolist(), draws.std(0, ddof=1).tolist()
    log(
        f"NUTS reference {npz.relative_to(HERE.parent)}: {info['chains']} chains × "
        f"{info['samples']:,} draws, R-hat max {max(info['r_hat']):.4f}, "
        f"ESS min {min(info['ess']):,.0f}, {info['divergences']} divergences"
    )
    return info, None


# =====================================================================
# driver
# =====================================================================
def run_worker(guide_name, n, lr, budget, args, accuracy, target):
    cmd = [sys.executable, __file__, "--worker", guide_name, str(n), str(lr), str(budget)]
    cmd += forwarded_options(args)
    if accuracy:
        cmd.append("--accuracy")
    if target is not None:
        cmd += ["--target-elbo", repr(target)]
    timeout = args.worker_timeout or (6 * budget + 1800)
    # keep freed memory in the process (glibc), so that pages touched once stay
    # mapped: see prefault()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 * 2**20), MALLOC_TRIM_THRESHOLD_=str(2**40))
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"guide": guide_name, "lr": lr, "n": n, "skip": f"worker over {timeout:.0f} s"}
    if proc.returncode != 0:
        return {
            "guide": guide_name,
            "lr": lr,
            "n": n,
            "skip": f"worker failed (exit code {proc.returncode}; see its log above)",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forwarded_options(args):
    opts = [
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--se",
        str(args.se),
        "--se-trajectory",
        str(args.se_trajectory),
        "--min-chunks",
        str(args.min_chunks),
        "--max-particles",
        str(args.max_particles),
        "--eval-seconds",
        str(args.eval_seconds),
        "--final-seconds",
        str(args.final_seconds),
        "--chunk-elements",
        str(args.chunk_elements),
        "--eval-growth",
        str(args.eval_growth),
        "--eval-min-gap",
        str(args.eval_min_gap),
        "--stop-tol",
        str(args.stop_tol),
        "--draws",
        str(args.draws),
    ]
    if args.eval_every:
        opts += ["--eval-every", str(args.eval_every)]
    if args.threads:
        opts += ["--threads", str(args.threads)]
    opts += ["--prefault-gb", str(args.prefault_gb)]
    return opts


def mvn_memory_bytes(n, args):
    """scale_tril, its gradient, Adam's two moments, and the masked copy the
    forward makes and its gradient: six d×d matrices."""
    return 6 * dimension(n) ** 2 * (4 if args.dtype == "float32" else 8)


def pyro_dense_hessian_seconds():
    """(seconds at dimension d0, d0) of the largest 'pyro dense' row of results/hessian.md."""
    if not HESSIAN_RESULTS.exists():
        return None
    best = None
    for line in HESSIAN_RESULTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[2] == "pyro dense" and re.fullmatch(r"[\d.]+", cells[3]):
            d = int(cells[1].replace(",", ""))
            if best is None or d > best[1]:
                best = (float(cells[3]), d)
    return best


def skip_reason(guide_name, n, budget, args, measured):
    """Why a peer is not run at ``n`` groups (or None), from estimates."""
    d = dimension(n)
    if guide_name == "AutoMultivariateNormal":
        need = mvn_memory_bytes(n, args)
        if need > args.memory_gb * 2**30:
            msg = (
                f"scale_tril is {d:,}² ({d * d / 1e6:,.0f} M entries): it, its gradient, Adam's "
                f"two moments and the forward's masked copy need ~{need / 2**30:.1f} GB "
                f"(limit --memory-gb {args.memory_gb:g})"
            )
            if "AutoMultivariateNormal" in measured:
                n0, s0 = measured["AutoMultivariateNormal"]
                msg += (
                    f"; ~{s0 * (d / dimension(n0)) ** 2:.2g} s/step extrapolated (d²) "
                    f"from {s0 * 1e3:.3g} ms/step at {n0:,} groups"
                )
            return msg
    if guide_name == "AutoLaplaceApproximation":
        estimates = []
        ref = pyro_dense_hessian_seconds()
        if ref:
            s0, d0 = ref
            estimates.append((s0 * (d / d0) ** 2, f"{s0:.3g} s at d = {d0:,} in results/hessian.md"))
        if "AutoLaplaceApproximation" in measured:
            n0, s0 = measured["AutoLaplaceApproximation"]
            estimates.append(
                (s0 * (d / dimension(n0)) ** 2, f"{s0:.3g} s at d = {dimension(n0):,} in this run")
            )
        if estimates and estimates[0][0] > budget:
            text = "; ".join(f"~{t:,.0f} s from {src}" for t, src in estimates)
            return (
                f"the dense {d:,}² Hessian of laplace_approximation() alone would take "
                f"longer than the {budget:.0f} s budget ({text}; d² scaling)"
            )
    return None


def choose(runs):
    """The better of a guide's runs: the higher final ELBO, or the faster to
    converge when the two are within 1 nat."""
    ok = [r for r in runs if r.get("final_elbo") is not None and math.isfinite(r["final_elbo"])]
    if not ok:
        return runs[0]
    ok.sort(key=lambda r: -r["final_elbo"])
    best = ok[0]
    for r in ok[1:]:
        if (
            best["final_elbo"] - r["final_elbo"] <= 1.0
            and r.get("converge_seconds") is not None
            and (best.get("converge_seconds") is None or r["converge_seconds"] < best["converge_seconds"])
        ):
            best = r
    return best


def amortized_elbo(n, results, args):
    """The final ELBO of AmortizedLaplaceGuide (trained with Adam) at ``n``
    groups: of this run, else (``--merge``) read from the results file."""
    if AMORTIZED in results.get(n, {}):
        return choose(results[n][AMORTIZED]).get("final_elbo")
    return args.merged_amortized.get(n)


def measure(sizes, budgets, args, reference):
    results = {}
    measured = {}  # guide -> (n, seconds) for extrapolation to larger N
    for n, budget in zip(sizes, budgets):
        results[n] = {}
        for guide_name in args.guide_list:
            if guide_name in DEFAULT_FIT_GUIDES:
                lrs = [None]  # one run: the fit chooses its own steps
            else:
                lrs = args.lrs_curvi if guide_name in CURVI_GUIDES else args.lrs_pyro
            reason = skip_reason(guide_name, n, budget, args, measured)
            if reason:
                log(f"[{guide_name} N={n:,}] skipped: {reason}")
                results[n][guide_name] = [{"guide": guide_name, "n": n, "lr": None, "skip": reason}]
                continue
            runs = []
            target = None
            if guide_name != AMORTIZED:
                target = amortized_elbo(n, results, args)
            for lr in lrs:
                log(f"[{guide_name}{f' lr={lr}' if lr is not None else ''} N={n:,}] budget {budget:.0f} s")
                r = run_worker(
                    guide_name,
                    n,
                    lr,
                    budget,
                    args,
                    accuracy=reference is not None and n == REFERENCE_N,
                    target=target,
                )
                if guide_name == AMORTIZED and "converge_seconds" in r:
                    r["reach_target_seconds"] = r["converge_seconds"]  # its own level
                runs.append(r)
                if r.get("steps"):
                    if guide_name == "AutoLaplaceApproximation" and r.get("hessian_seconds"):
                        measured[guide_name] = (n, r["hessian_seconds"])
                    elif guide_name != "AutoLaplaceApproximation":
                        measured[guide_name] = (n, r["train_seconds"] / r["steps"])
            results[n][guide_name] = runs
    return results


# --------------------------------------------------------------- formatting
def steps_of(r):
    return r.get("steps") or 0


def fmt_time(t):
    return "never" if t is None else f"{t:.3g}"


def fmt_elbo(r):
    if r.get("final_elbo") is None or not math.isfinite(r["final_elbo"]):
        return "–"
    return f"{r['final_elbo']:,.2f} ± {r['final_se']:.2f}"


def run_summary(r):
    """A one-line account of a run for the notes."""
    if "skip" in r:
        return f"lr {r['lr']}: {r['skip']}"
    if r.get("final_elbo") is None:
        return f"lr {r['lr']}: failed ({r.get('error') or '?'})"
    text = f"lr {r['lr']}: ELBO {fmt_elbo(r)}, converged in {fmt_time(r.get('converge_seconds'))} s"
    if r.get("error"):
        text += f" (stopped at step {r.get('steps', 0):,}: {r['error']})"
    return text


def fmt_lr(r):
    if r.get("guide") in DEFAULT_FIT_GUIDES:
        return "default"
    return "–" if r.get("lr") is None else str(r["lr"])


def speed_rows(runs_by_guide, chosen, args, ref_elbo):
    """{guide: its row of the speed table}; ``ref_elbo``: AmortizedLaplaceGuide's final ELBO."""
    rows = {}
    has_ref = ref_elbo is not None and math.isfinite(ref_elbo)
    for guide_name in args.guide_list:
        runs = runs_by_guide[guide_name]
        r = chosen[guide_name]
        if "skip" in r:
            rows[guide_name] = f"| {guide_name} | – | – | – | – | – | – | – | skipped: {r['skip']} |"
            continue
        notes = []
        default_fit = guide_name in DEFAULT_FIT_GUIDES
        if r.get("error") and r.get("final_elbo") is None:
            notes.append(f"failed: {r['error']}")
        elif r.get("error"):
            notes.append(f"stopped at step {steps_of(r):,} (the best point before is reported): {r['error']}")
        if default_fit and r.get("fit_seconds") is not None:
            notes.append(
                f"stopped by itself after {steps_of(r):,} evaluations, {r['fit_seconds']:.3g} s of "
                f"training (its final state is reported); the fit's message: {r.get('fit_message')}"
            )
        elif default_fit and not r.get("error"):
            notes.append(
                "did not stop by itself within the budget (the best point is reported): "
                f"{r.get('fit_message')}"
            )
        if r.get("trajectory") and (guide_name in CURVI_GUIDES or default_fit):
            notes.append(f"first step (with the set-up) done at {r['trajectory'][0][0]:.3g} s")
        if r.get("repair"):
            notes.append(f"precision at the final point: {r['repair']}")
        if r.get("map_error"):
            notes.append(f"MAP stopped: {r['map_error']}")
        notes += r.get("notes", [])
        if guide_name == "AutoLaplaceApproximation" and r.get("hessian_seconds") is not None:
            notes.append(
                f"MAP {r['train_seconds']:.1f} s (within 1 nat of its best log p at "
                f"{r.get('map_converge_seconds', math.nan):.3g} s) + Hessian "
                f"{r['hessian_seconds']:.1f} s"
            )
        others = [o for o in runs if o is not r]
        notes += [f"other {run_summary(o)}" for o in others]
        if r.get("final_particles"):
            notes.append(f"final ELBO from {r['final_particles']:,} particles")
        if r.get("peak_mb", 0) > 1.1 * r.get("pool_mb", 0):  # else hidden by the prefault pool
            notes.append(f"peak RSS {r['peak_mb']:,.0f} MB")
        steps = r.get("steps") or 0
        ms = f"{1e3 * r['train_seconds'] / steps:.3g}" if steps else "–"
        has_elbo = r.get("final_elbo") is not None and math.isfinite(r["final_elbo"])
        delta = f"{r['final_elbo'] - ref_elbo:+,.2f}" if has_elbo and has_ref else "–"
        reach = fmt_time(r.get("reach_target_seconds")) if has_elbo and has_ref else "–"
        rows[guide_name] = (
            f"| {guide_name} | {fmt_lr(r)} | {steps:,} | {ms} | "
            f"{fmt_time(r.get('converge_seconds')) if has_elbo else '–'} | {fmt_elbo(r)} | {delta} | "
            f"{reach} | {'; '.join(notes)} |"
        )
    return rows


def table_for_n(n, budget, runs_by_guide, chosen, args, ref_elbo):
    lines = [
        f"### {n:,} groups (dimension {dimension(n):,}; budget {budget:.0f} s)",
        "",
        "| guide | lr | steps | ms/step | time to converge (s) | final ELBO ± SE | Δ vs amortized "
        "| time to amortized's ELBO − 1 nat (s) | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += speed_rows(runs_by_guide, chosen, args, ref_elbo).values()
    return "\n".join(lines)


def accuracy_stats(r, reference):
    import numpy as np

    g = r.get("globals")
    if not g:
        return None
    mean, sd = np.asarray(reference["mean"]), np.asarray(reference["sd"])
    z = np.abs(np.asarray(g["mean"]) - mean) / sd
    ratio = np.asarray(g["sd"]) / sd
    return {
        "z": z,
        "ratio": ratio,
        "max_z": float(z.max()),
        "min_ratio": float(ratio.min()),
        "max_ratio": float(ratio.max()),
        "draws": g["draws"],
    }


def accuracy_table(chosen, reference, message, args):
    if message:
        return f"### Accuracy of the global posterior at {REFERENCE_N:,} groups\n\n{message}\n"
    if REFERENCE_N not in chosen:
        return ""
    info = reference
    lines = [
        f"### Accuracy of the global posterior at {REFERENCE_N:,} groups (vs NUTS)",
        "",
        f"Reference: NumPyro NUTS on the non-centred model, {info['chains']} chains × "
        f"({info['warmup']:,} warm-up + {info['samples']:,} draws), float64, "
        f"{info['seconds']:.0f} s, {info['divergences']} divergences; R-hat ≤ "
        f"{max(info['r_hat']):.4f}, ESS ≥ {min(info['ess']):,.0f} "
        f"(`benchmarks/reference/nuts_{REFERENCE_N}.npz`, {info['date']}).",
        "NUTS "
        + ", ".join(f"{n} {m:.3f} (sd {s:.3f})" for n, m, s in zip(GLOBALS, info["mean"], info["sd"]))
        + ".",
        "",
        "| guide | lr | draws | max over globals of abs(Δmean) / NUTS sd | sd / NUTS sd (min – max) "
        "| abs(Δmean)/sd: " + ", ".join(GLOBALS) + " | sd ratio: " + ", ".join(GLOBALS) + " |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    lines += accuracy_rows(chosen, reference, args).values()
    return "\n".join(lines) + "\n"


def accuracy_rows(chosen, reference, args):
    """{guide: its row of the accuracy table}."""
    rows = {}
    for guide_name in args.guide_list:
        r = chosen[REFERENCE_N][guide_name]
        a = accuracy_stats(r, reference)
        if a is None:
            why = r.get("skip") or r.get("error") or "no draws"
            rows[guide_name] = f"| {guide_name} | {fmt_lr(r)} | – | – | – | {why} | |"
            continue
        rows[guide_name] = (
            f"| {guide_name} | {fmt_lr(r)} | {a['draws']:,} | {a['max_z']:.3f} | "
            f"{a['min_ratio']:.3f} – {a['max_ratio']:.3f} | "
            + ", ".join(f"{v:.3f}" for v in a["z"])
            + " | "
            + ", ".join(f"{v:.3f}" for v in a["ratio"])
            + " |"
        )
    return rows


def summary(sizes, results, chosen, reference, args):
    """One line per target of the issue, computed from the runs."""
    lines = []
    speed_n = max(sizes)
    c = chosen[speed_n]
    if AMORTIZED in c:
        amort = c[AMORTIZED]
        if amort.get("converge_seconds") is not None:
            t = amort["converge_seconds"]
            lines.append(
                f"- Speed at {speed_n:,} groups: {AMORTIZED} converged (to within 1 nat of its final "
                f"ELBO) in {t:.3g} s of training (target ≤ 10 s: {'met' if t <= 10 else 'NOT met'})."
            )
            runs = [r for g in PYRO_GUIDES for r in results[speed_n].get(g, []) if "skip" not in r]
            reached = [(r.get("reach_target_seconds"), r["guide"], r["lr"]) for r in runs]
            reached_ok = [x for x in reached if x[0] is not None]
            if reached_ok:
                t2, g, lr = min(reached_ok)
                ratio = t2 / t
                lines.append(
                    f"- The fastest Pyro guide to reach {AMORTIZED}'s ELBO − 1 nat is {g} "
                    f"(lr {lr}), in {t2:.3g} s: {ratio:.1f}× the amortized guide's time "
                    f"(target ≥ 10×: {'met' if ratio >= 10 else 'NOT met'})."
                )
            else:
                ran = sorted({g for _, g, _ in reached})
                budget = amort.get("budget", math.nan)
                lines.append(
                    f"- No Pyro guide ({', '.join(ran) or 'none ran'}) reached {AMORTIZED}'s ELBO "
                    f"within 1 nat in its {budget:.0f} s budget: ≥ {budget / t:.1f}× "
                    f"(target ≥ 10×: {'met' if budget / t >= 10 else 'not shown'})."
                )
        else:
            lines.append(
                f"- Speed at {speed_n:,} groups: {AMORTIZED} did not converge: "
                f"{amort.get('error') or amort.get('skip') or '?'}."
            )
        if reference is not None and REFERENCE_N in chosen:
            a = accuracy_stats(chosen[REFERENCE_N][AMORTIZED], reference)
            if a:
                ok_mean, ok_sd = a["max_z"] <= 0.1, a["min_ratio"] >= 0.9 and a["max_ratio"] <= 1.1
                lines.append(
                    f"- Accuracy at {REFERENCE_N:,} groups: {AMORTIZED}'s global means within "
                    f"{a['max_z']:.3f} NUTS sd (target ≤ 0.1: {'met' if ok_mean else 'NOT met'}); "
                    f"sds {a['min_ratio']:.3f}–{a['max_ratio']:.3f} of NUTS' "
                    f"(target within 10 %: {'met' if ok_sd else 'NOT met'})."
                )
    for more in default_fit_targets(sizes, results, chosen, reference, args).values():
        lines += more
    return "\n".join(lines)


def default_fit_prefix(guide_name):
    """How the Targets lines of a default-fit row begin (``--merge`` replaces them)."""
    return f"- {guide_name}:"


def default_fit_targets(sizes, results, chosen, reference, args):
    """{default-fit guide: its lines of the Targets section}: the speed target
    judged on the time until the fit stopped by itself (what its user waits),
    the accuracy targets as for the amortized guide."""
    out = {}
    speed_n = max(sizes)
    for g in [g for g in args.guide_list if g in DEFAULT_FIT_GUIDES]:
        lines = []
        r = chosen[speed_n][g]
        t_stop, t_conv = r.get("fit_seconds"), r.get("converge_seconds")
        if t_stop is not None:
            ref = amortized_elbo(speed_n, results, args)
            delta = (
                f"; final ELBO {r['final_elbo'] - ref:+,.2f} nat vs {AMORTIZED} trained with Adam"
                if ref is not None and r.get("final_elbo") is not None
                else ""
            )
            lines.append(
                f"{default_fit_prefix(g)} at {speed_n:,} groups it stopped by itself after "
                f"{t_stop:.3g} s of training (within 1 nat of its final ELBO from {fmt_time(t_conv)} s)"
                f"{delta} (target ≤ 10 s: {'met' if t_stop <= 10 else 'NOT met'})."
            )
        else:
            lines.append(
                f"{default_fit_prefix(g)} at {speed_n:,} groups it did not stop by itself: "
                f"{r.get('error') or r.get('skip') or r.get('fit_message') or '?'}."
            )
        if reference is not None and REFERENCE_N in chosen:
            a = accuracy_stats(chosen[REFERENCE_N][g], reference)
            if a:
                ok_mean, ok_sd = a["max_z"] <= 0.1, a["min_ratio"] >= 0.9 and a["max_ratio"] <= 1.1
                lines.append(
                    f"{default_fit_prefix(g)} accuracy at {REFERENCE_N:,} groups: global means within "
                    f"{a['max_z']:.3f} NUTS sd (target ≤ 0.1: {'met' if ok_mean else 'NOT met'}); "
                    f"sds {a['min_ratio']:.3f}–{a['max_ratio']:.3f} of NUTS' "
                    f"(target within 10 %: {'met' if ok_sd else 'NOT met'})."
                )
        out[g] = lines
    return out


def default_fit_text():
    """What the default-fit rows measure (in the header, or in a merge's note)."""
    return (
        "**Default fit** (the rows '…, default fit'): `curvi.fit(model, guide, *data)` with no "
        "`optim`, `loss` or `steps` -- the guide's `LaplaceNewton()`: sample-average Newton, 8 "
        "antithetic particles per evaluation (doubled when its checks ask), which stops by "
        "itself -- plus `progress=False` and the `callback` that pauses the clock; one run (no "
        "learning rate); *steps* are its loss-and-gradient evaluations. Its ELBO is estimated "
        "at the same evaluation points as the Adam runs, each from a copy of the guide's state "
        "that is put back afterwards (so the estimates do not change the fit). Its final ELBO "
        "is that of the state the fit returns (the blocks' average θ̂), not the trajectory's "
        "best point, and its time to converge the first point within 1 nat of it; the budget "
        "is only a cap. The training time includes the guide's set-up."
    )


def provenance():
    """Machine, versions and checkout, for a header or a merge's note."""
    import pyro
    import torch

    try:
        sha = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        checkout = f"; curvi at {sha}{' (uncommitted changes)' if dirty else ''}" if sha else ""
    except OSError:
        checkout = ""
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, pyro {pyro.__version__}{checkout}; {datetime.date.today().isoformat()}"
    )


def command_line():
    return ("python benchmarks/guides.py " + " ".join(sys.argv[1:])).strip()


def header(args, sizes, budgets):
    cmd = command_line()
    return (
        "# Time to a converged ELBO: Laplace guides vs Pyro's autoguides\n\n"
        f"Hierarchical logistic model (`benchmarks/common.py`): 4 globals, random intercept + "
        f"slope per group, {OBS_PER_GROUP} observations per group, `simulate(N, seed=0)`; "
        f"{args.dtype}.\n"
        f"Machine: {provenance()}. Command: `{cmd}`.\n\n"
        "Each guide is trained with Adam (`curvi.fit`, single-particle `Trace_ELBO`; the "
        "default-fit rows: see below) for a "
        "wall-clock budget ("
        + ", ".join(f"{b:.0f} s at {n:,} groups" for n, b in zip(sizes, budgets))
        + f") or until its best ELBO estimate gains < {args.stop_tol:g} nat over the second half "
        "of its training time. At evaluation points (training times growing by "
        f"×{args.eval_growth:g}, at most {args.eval_every or 'budget / 20'} s apart) the clock is "
        "paused, the guide's state kept and its ELBO estimated: chunks of "
        "`Trace_ELBO(num_particles=K, vectorize_particles=True)` until the standard error of the "
        f"chunk means is ≤ {args.se_trajectory:g} nat. **Final ELBO**: the best point "
        f"re-evaluated independently to SE ≤ {args.se:g} nat (cap {args.final_seconds:g} s, "
        f"{args.max_particles:,} particles). **Time to converge** / **to amortized's ELBO − 1 "
        "nat**: training seconds to the first point at or above that level, any point within 3 "
        f"SE of the level being refined to SE ≤ {args.se:g} before it is judged. Learning rates: "
        f"Pyro's guides {', '.join(map(str, args.lrs_pyro))}, curvi's "
        f"{', '.join(map(str, args.lrs_curvi))}; the row shows the run with the higher final "
        "ELBO (the faster to converge if within 1 nat), the other in the notes. "
        "AutoLaplaceApproximation: MAP by Adam (its objective, log p at the point, is exact), "
        "then `laplace_approximation()`; its time is the MAP's time to within 1 nat of its "
        "final log p plus the Hessian, its ELBO that of the resulting AutoMultivariateNormal. "
        "Training time includes every guide's set-up (curvi's guides start at the mode of the "
        "Laplace marginal and solve the units' modes: that is in their first step). Each run is "
        f"a process of its own that first touches {args.prefault_gb:g} GB of memory, untimed "
        "(first touches of memory are slow in VMs); a peak RSS is noted when it exceeds that.\n\n"
        + (default_fit_text() + "\n\n" if any(g in DEFAULT_FIT_GUIDES for g in args.guide_list) else "")
    )


# ------------------------------------------------------------------- merge
def table_cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def section_bounds(lines, prefix, path):
    """(first, end) line indices of the section whose heading starts with ``prefix``."""
    start = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if start is None:
        raise SystemExit(f"--merge: {path} has no section '{prefix}...': run the full table first")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
    return start, end


def table_rows(lines, start, end):
    """Indices of the data rows of the (first) table between ``start`` and ``end``."""
    table = [i for i in range(start, end) if lines[i].startswith("|")]
    return [i for i in table[1:] if not lines[i].startswith("|---")]


def read_amortized_elbos(path, sizes):
    """{N: AmortizedLaplaceGuide's final ELBO} from the speed tables of a results file."""
    lines, out = path.read_text().splitlines(), {}
    for n in sizes:
        start, end = section_bounds(lines, f"### {n:,} groups (", path)
        for i in table_rows(lines, start, end):
            cells = table_cells(lines[i])
            if cells[0] == AMORTIZED and len(cells) > 5 and "±" in cells[5]:
                out[n] = float(cells[5].split("±")[0].replace(",", ""))
    return out


def put_row(lines, start, end, guide_name, row):
    """Replace ``guide_name``'s row of the table in lines[start:end], or insert it
    after the rows of the guides before it in GUIDES' order."""
    rows = table_rows(lines, start, end)
    for i in rows:
        if table_cells(lines[i])[0] == guide_name:
            lines[i] = row
            return
    order = GUIDES.index(guide_name)
    before = [i for i in rows if table_cells(lines[i])[0] in GUIDES[:order]]
    if before:
        at = before[-1] + 1
    elif rows:
        at = rows[0]
    else:
        at = max(i for i in range(start, end) if lines[i].startswith("|---")) + 1
    lines.insert(at, row)


def merge_results(path, speed, accuracy, targets, args):
    """The text of the results file at ``path`` with the rows of this run in
    place of (or added to) its own, a note of where they came from after its
    header's command, and the default-fit lines of its Targets replaced."""
    lines = path.read_text().splitlines()
    for n, rows in speed.items():
        for guide_name, row in rows.items():
            start, end = section_bounds(lines, f"### {n:,} groups (", path)
            put_row(lines, start, end, guide_name, row)
    for guide_name, row in accuracy.items():
        start, end = section_bounds(lines, "### Accuracy of the global posterior", path)
        put_row(lines, start, end, guide_name, row)
    if targets:
        start, end = section_bounds(lines, "### Targets", path)
        prefixes = tuple(default_fit_prefix(g) for g in targets)
        kept = [line for line in lines[start:end] if not line.startswith(prefixes)]
        while kept and not kept[-1].strip():
            kept.pop()
        kept += [line for more in targets.values() for line in more]
        lines[start:end] = kept + ([""] if end < len(lines) else [])
    guides = ", ".join(args.guide_list)
    tag = f"Merged rows ({guides}):"
    note = (
        f"{tag} from a later run; machine: {provenance()}. Command: `{command_line()}`. "
        f"The other rows are from the command above; these rows' Δ vs amortized and time to "
        f"amortized's ELBO − 1 nat use the {AMORTIZED} final ELBO of the tables below."
    )
    if any(g in DEFAULT_FIT_GUIDES for g in args.guide_list):
        note += " " + default_fit_text()
    same = [i for i, line in enumerate(lines) if line.startswith(tag)]
    if same:
        lines[same[0]] = note
    else:
        at = next(i for i, line in enumerate(lines) if line.startswith("Machine:"))
        while at + 2 < len(lines) and not lines[at + 1].strip() and lines[at + 2].startswith("Merged rows ("):
            at += 2
        lines[at + 1 : at + 1] = ["", note]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 000 groups, 15 s budgets, looser SEs and caps; no file written",
    )
    parser.add_argument("--sizes", type=int, nargs="*", help="numbers of groups")
    parser.add_argument("--budgets", type=float, nargs="*", help="training seconds per size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--lrs-pyro", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--lrs-curvi", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument(
        "--guides",
        nargs="+",
        choices=list(GUIDE_KEYS) + GUIDES,
        metavar="GUIDE",
        help="a subset of the guides, by short name: "
        + ", ".join(f"{k} ({v})" for k, v in GUIDE_KEYS.items())
        + f"; {AMORTIZED} is added (the others' reference) unless --merge",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the rows of --guides into the existing results file (--out, default "
        "results/guides.md): replace or add them, keep the others, note the run in the header",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default results/guides.md; written by a full run, or with --out/--merge)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--se", type=float, default=0.2, help="SE (nats) of the final ELBO and of points judged near a level"
    )
    parser.add_argument(
        "--se-trajectory", type=float, default=1.0, help="SE (nats) of the estimates taken during training"
    )
    parser.add_argument(
        "--min-chunks",
        type=int,
        default=8,
        help="chunks per estimate at least (its SE comes from their means)",
    )
    parser.add_argument("--max-particles", type=int, default=500_000)
    parser.add_argument(
        "--eval-seconds", type=float, default=30.0, help="cap on one estimate during training"
    )
    parser.add_argument(
        "--final-seconds", type=float, default=600.0, help="cap on the final estimate and on each refinement"
    )
    parser.add_argument(
        "--chunk-elements",
        type=float,
        default=2.5e6,
        help="particles × observations per chunk (bounds the memory)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--prefault-gb", type=float, default=2.0, help="memory each worker touches before its clock starts"
    )
    parser.add_argument(
        "--eval-growth",
        type=float,
        default=1.25,
        help="evaluations at training times growing by this factor ...",
    )
    parser.add_argument("--eval-min-gap", type=float, default=0.25, help="... at least this apart")
    parser.add_argument(
        "--eval-every", type=float, default=None, help="... and at most this apart (default budget / 20)"
    )
    parser.add_argument("--stop-tol", type=float, default=0.5, help="nats; see the header")
    parser.add_argument("--draws", type=int, default=8000, help="guide draws for the accuracy table")
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=4.0,
        help="skip AutoMultivariateNormal when its parameters would need more",
    )
    parser.add_argument("--worker-timeout", type=float, default=None)
    parser.add_argument("--regenerate-nuts", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the NUTS comparison")
    parser.add_argument("--nuts-chains", type=int, default=NUTS_DEFAULTS["chains"])
    parser.add_argument("--nuts-warmup", type=int, default=NUTS_DEFAULTS["warmup"])
    parser.add_argument("--nuts-samples", type=int, default=NUTS_DEFAULTS["samples"])
    parser.add_argument("--nuts-seed", type=int, default=NUTS_DEFAULTS["seed"])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--nuts-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target-elbo", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)
    if args.nuts_worker:
        return nuts_worker(args.nuts_worker, args)

    if args.quick:
        sizes = args.sizes or [REFERENCE_N]
        budgets = args.budgets or [15.0] * len(sizes)
        if "--se" not in sys.argv:
            args.se = 0.5
        if "--se-trajectory" not in sys.argv:
            args.se_trajectory = 2.0
        if "--eval-seconds" not in sys.argv:
            args.eval_seconds = 5.0
        if "--final-seconds" not in sys.argv:
            args.final_seconds = 20.0
        if "--min-chunks" not in sys.argv:
            args.min_chunks = 4
        if "--draws" not in sys.argv:
            args.draws = 4000
    else:
        sizes = args.sizes or SIZES
        budgets = args.budgets or (
            [b for n, b in zip(SIZES, BUDGETS) if n in sizes]
            if set(sizes) <= set(SIZES)
            else [120.0] * len(sizes)
        )
    if len(budgets) != len(sizes):
        parser.error("--budgets needs one value per size")
    selected = [GUIDE_KEYS.get(g, g) for g in args.guides or []]
    out_path = args.out or (RESULTS if not args.quick and not args.guides else None)
    args.merged_amortized = {}
    if args.merge:
        if not selected:
            parser.error("--merge needs --guides: the rows to re-run")
        out_path = args.out or RESULTS
        if not out_path.exists():
            parser.error(f"--merge: {out_path} does not exist (run the full table first)")
        args.guide_list = [g for g in GUIDES if g in selected]
        if AMORTIZED not in args.guide_list:
            args.merged_amortized = read_amortized_elbos(out_path, sizes)
            log(f"{AMORTIZED}'s final ELBO from {out_path}: {args.merged_amortized}")
        else:
            log(
                f"note: {AMORTIZED} is re-run, but the kept rows' Δ vs amortized and the Targets "
                "lines of the Adam-trained guides are not recomputed: run the full table for that"
            )
    else:
        args.guide_list = [g for g in GUIDES if not selected or g in selected or g == AMORTIZED]

    reference, message = None, None
    if REFERENCE_N in sizes and not args.no_accuracy:
        reference, message = load_reference(REFERENCE_N, args)
        if message:
            log(message)
    elif args.regenerate_nuts:
        reference, message = load_reference(REFERENCE_N, args)

    results = measure(sizes, budgets, args, reference if REFERENCE_N in sizes else None)
    chosen = {n: {g: choose(runs) for g, runs in results[n].items()} for n in sizes}
    ref = reference if REFERENCE_N in sizes else None
    if args.merge:
        speed = {n: speed_rows(results[n], chosen[n], args, amortized_elbo(n, results, args)) for n in sizes}
        accuracy = (
            accuracy_rows(chosen, reference, args)
            if REFERENCE_N in sizes and reference is not None and not args.no_accuracy
            else {}
        )
        targets = default_fit_targets(sizes, results, chosen, ref, args)
        text = merge_results(out_path, speed, accuracy, targets, args)
        print("\n".join(["", *(r for rows in speed.values() for r in rows.values()), *accuracy.values()]))
        out_path.write_text(text)
        print(f"merged into {out_path}")
        return
    text = header(args, sizes, budgets)
    for n, budget in zip(sizes, budgets):
        ref_elbo = amortized_elbo(n, results, args)
        text += table_for_n(n, budget, results[n], chosen[n], args, ref_elbo) + "\n\n"
    if REFERENCE_N in sizes and not args.no_accuracy:
        text += accuracy_table(chosen, reference, message, args) + "\n"
    text += "### Targets\n\n" + summary(sizes, results, chosen, ref, args) + "\n"
    print("\n" + text)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
        print(f"written to {out_path}")


if __name__ == "__main__":
    main()
