"""Part of ``benchmarks/natural.py``: sample-average Newton for
AmortizedLaplaceGuide on the hierarchical logistic model, against Pyro's Adam
on the same guide.

Model and data: ``benchmarks/common.py`` (random intercept and slope, 10
observations per group, ``simulate(N, seed=0)``), float64. Every method
starts from the guide's own start (the mode of the Laplace marginal, its
``init_to_mode``; with ``--starts prior`` also from the prior medians) and
trains its only parameter θ̂:

* **Adam** -- ``SVI`` + ``Trace_ELBO`` (1 or 8 vectorized particles) +
  ``pyro.optim.Adam`` at each learning rate of ``--adam-lrs``;
* **curvi.fit default** -- ``curvi.fit(model, guide, *data)`` with no
  options: what a user gets, the guide's ``default_optim``, i.e.
  ``curvi.LaplaceNewton()`` (8 antithetic particles, 3 noise blocks, line
  search, BFGS, trust region, a final 32-particle ELBO estimate; the
  particles double when the draws' ELBOs are heavy-tailed);
* **fit_newton 1 block** -- ``curvi.fit_newton(..., blocks=1)``, the same
  with a single noise block.

An evaluation is one loss-and-gradient evaluation (an SVI step; for Newton,
line-search trials and the final estimate included). θ̂ is recorded after
every evaluation with the training clock (for Newton in ``fit``'s
``callback``, so a recorded θ̂ may be a line-search trial point; the
record-keeping is off the clock), and the final θ̂ of a Newton fit (the
blocks' average, ``result.info["theta"]``) at its last evaluation.
Afterwards the gap ``ELBO(θ*) − ELBO(θ̂)`` is estimated at evaluations 0–10
and then every 25 % more, by common random numbers (the same antithetic
noise at θ* and θ̂, ``--gap-chunks`` × ``--gap-particles`` particles). θ*
is ``fit_newton`` with ``--ref-particles`` particles × ``--ref-blocks``
blocks. Reported: evaluations and seconds (the guide's set-up included) to
first reach within 1 and 0.1 nat of θ*'s ELBO, and from which the gap stays
within 0.1 nat, ms per evaluation, and the last gap.

Two targets are measured separately, on the default path, ``--repeats``
times in float64 and float32:

* ≤ 2 s to within 0.1 nat at 10 000 groups: guide set-up + ``curvi.fit``
  with no options; the median seconds, the evaluations and the gap of each
  result (the default's noise seed is fixed, so repeats differ only in
  their timing);
* a second ``curvi.fit`` from the fitted guide changes a 64-particle ELBO by
  < 0.5 nat: after each timed fit, the default fit again on the same guide;
  the change of the common-random-numbers ELBO (antithetic, at least 64
  particles: ``max(--gap-chunks, ⌈64 / --gap-particles⌉)`` chunks) from the
  θ̂ after the first fit to the θ̂ after the second.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import pyro
import torch
from common import numpyro_model_noncentred, simulate, torch_model
from pyro.infer import SVI, Trace_ELBO

import curvi
from curvi import AmortizedLaplaceGuide
from curvi.laplace_newton import FixedNoise, fit_newton, particle_elbos

NEWTON = (("curvi.fit", "default"), ("fit_newton", "1 block"))
REFIT_PARTICLES = 64


def checkpoints(last):
    points, i = list(range(0, min(last, 10) + 1)), 10
    while i < last:
        i = max(i + 1, int(math.ceil(i * 1.25)))
        points.append(min(i, last))
    return sorted(set(points))


def new_guide(data, start="mode"):
    """A fresh guide and the seconds of its set-up (its first call); its θ̂
    starts at the Laplace-marginal mode (``"mode"``) or at the prior medians
    (``"prior"``)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # the prior medians are those of random draws
    guide = AmortizedLaplaceGuide(torch_model, unit_plate="groups", init_to_mode=start == "mode")
    start = time.perf_counter()
    with pyro.poutine.block():
        guide(*data)
    return guide, time.perf_counter() - start


def svi_run(data, start, optim_for, particles, max_iters, max_seconds, seed=0):
    """Trajectory [(evaluation, clock, θ̂)] of SVI from the guide's start."""
    guide, setup = new_guide(data, start)
    pyro.set_rng_seed(seed)
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=2)
    svi = SVI(torch_model, guide, optim_for(guide), loss)
    param = guide.loc_global_unconstrained
    trajectory, clock = [(0, 0.0, param.detach().clone())], 0.0
    for it in range(1, max_iters + 1):
        start = time.perf_counter()
        svi.step(*data)
        clock += time.perf_counter() - start
        trajectory.append((it, clock, param.detach().clone()))
        if clock > max_seconds:
            break
    return setup, trajectory


def newton_run(data, start, blocks=None):
    """Trajectory [(evaluation, clock, θ̂)] of ``curvi.fit`` with no options
    (``blocks=None``) or of ``fit_newton(blocks=blocks)``, and the result."""
    guide, setup = new_guide(data, start)
    param = guide.loc_global_unconstrained
    trajectory = [(0, 0.0, param.detach().clone())]
    state = {"paused": 0.0}

    def callback(evaluations, elbo):  # after each evaluation
        now = time.perf_counter()
        trajectory.append((evaluations, now - state["start"] - state["paused"], param.detach().clone()))
        state["paused"] += time.perf_counter() - now

    state["start"] = time.perf_counter()
    if blocks is None:
        result = curvi.fit(torch_model, guide, *data, progress=False, callback=callback)
    else:
        result = fit_newton(torch_model, guide, *data, blocks=blocks, callback=callback)
    clock = time.perf_counter() - state["start"] - state["paused"]
    # the final θ̂ (the blocks' average) at the evaluations the fit counted
    final = (result.num_evaluations, clock, result.info["theta"].detach().clone())
    if trajectory[-1][0] == final[0]:
        trajectory[-1] = final
    else:
        trajectory.append(final)
    return setup, trajectory, result


class Gap:
    """ELBO(θ*) − ELBO(θ) by common random numbers, on one evaluation guide."""

    def __init__(self, data, theta_star, guide, chunks, particles):
        self.data, self.guide, self.chunks, self.particles = data, guide, chunks, particles
        self.theta_star = theta_star
        self.reference = [self._elbo(theta_star, c) for c in range(chunks)]

    def _elbo(self, theta, chunk):
        with torch.no_grad():
            self.guide.loc_global_unconstrained.copy_(theta)
            with FixedNoise(50_000 + chunk):
                return (
                    particle_elbos(
                        torch_model, self.guide, *self.data, num_particles=self.particles, max_plate_nesting=2
                    )
                    .mean()
                    .item()
                )

    def __call__(self, theta):
        diffs = [ref - self._elbo(theta, c) for c, ref in enumerate(self.reference)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        return statistics.fmean(diffs), se

    def change(self, before, after, chunks=None):
        """ELBO(after) − ELBO(before) by common random numbers over
        ``chunks`` chunks (default this gap's), and its standard error."""
        diffs = [self._elbo(after, c) - self._elbo(before, c) for c in range(chunks or self.chunks)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        return statistics.fmean(diffs), se


def summarise(setup, trajectory, gap):
    """For 1 and 0.1 nat: (evaluation, seconds) of the first checkpoint within
    it, and of the checkpoint from which every later one stays within it;
    ms per evaluation; the last gap."""
    wanted = set(checkpoints(trajectory[-1][0]))
    points = [
        (it, setup + clock, gap(theta)[0])
        for it, clock, theta in trajectory
        if it in wanted or (it, clock) == trajectory[-1][:2]
    ]
    first, settled = {}, {}
    for level in (1.0, 0.1):
        first[level] = next(((it, t) for it, t, g in points if g <= level), None)
        settled[level] = None
        for it, t, g in reversed(points):
            if g > level:
                break
            settled[level] = (it, t)
    iters, clock = trajectory[-1][0], trajectory[-1][1]
    return first, settled, 1000 * clock / max(iters, 1), points[-1][2]


def nuts_seconds(x, y, warmup=500, samples=1000):
    """NumPyro NUTS on the non-centred model (jit compilation included)."""
    import jax
    from numpyro.infer import MCMC, NUTS

    jax.config.update("jax_enable_x64", True)
    mcmc = MCMC(NUTS(numpyro_model_noncentred), num_warmup=warmup, num_samples=samples, progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(0), x, y)
    jax.block_until_ready(mcmc.get_samples()["beta"])
    return time.perf_counter() - start


def default_path(data, repeats, small):
    """The targets' runs: guide set-up + ``curvi.fit`` with no options (timed),
    then a second default fit from the fitted guide (timed apart), in float64
    and float32; per dtype a list of dicts."""
    timings = {}
    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)
        cast = tuple(a.to(dtype) for a in data)
        warm = tuple(a.to(dtype) for a in small)
        curvi.fit(torch_model, new_guide(warm)[0], *warm, progress=False)  # warm-up
        name = str(dtype).split(".")[-1]
        runs = []
        for r in range(repeats):
            clock = time.perf_counter()
            guide, setup = new_guide(cast)
            first = curvi.fit(torch_model, guide, *cast, progress=False)
            total = time.perf_counter() - clock
            clock = time.perf_counter()
            second = curvi.fit(torch_model, guide, *cast, progress=False)
            refit_seconds = time.perf_counter() - clock
            runs.append(
                {
                    "total": total,
                    "setup": setup,
                    "evaluations": first.num_evaluations,
                    "theta": first.info["theta"].detach().to(torch.float64).clone(),
                    "message": first.message,
                    "converged": first.converged,
                    "refit_theta": second.info["theta"].detach().to(torch.float64).clone(),
                    "refit_evaluations": second.num_evaluations,
                    "refit_seconds": refit_seconds,
                    "refit_message": second.message,
                }
            )
            print(
                f"  default path {name}, run {r + 1}/{repeats}: set-up + fit {total:.2f} s "
                f"({first.num_evaluations} evaluations); second fit {refit_seconds:.2f} s "
                f"({second.num_evaluations} evaluations)",
                flush=True,
            )
        timings[name] = runs
    torch.set_default_dtype(torch.float64)
    return timings


def run(args):
    """Markdown section and target lines of the hierarchical part."""
    warnings.simplefilter("ignore")
    torch.set_default_dtype(torch.float64)
    x, y, *_ = simulate(args.groups, seed=0)
    data = (torch.tensor(x), torch.tensor(y))
    small = tuple(torch.tensor(a) for a in simulate(100, seed=1)[:2])

    timings = default_path(data, args.repeats, small)

    runs, results = {}, {}
    for start in args.starts:
        for particles in (1, 8):
            for lr in args.adam_lrs:
                runs[(start, "Adam", f"lr {lr:g}", particles)] = svi_run(
                    data,
                    start,
                    lambda g: pyro.optim.Adam({"lr": lr}),  # noqa: B023
                    particles,
                    args.max_iters,
                    args.max_seconds,
                )
                print(f"  {start}: Adam lr={lr} K={particles} done", flush=True)
        for (method, setting), blocks in zip(NEWTON, (None, 1)):
            setup, trajectory, result = newton_run(data, start, blocks)
            runs[(start, method, setting, 8)] = (setup, trajectory)
            results[(start, method, setting, 8)] = result
            print(f"  {start}: {method} {setting} done: {result.message}", flush=True)

    eval_guide, _ = new_guide(data)
    clock = time.perf_counter()
    ref = fit_newton(
        torch_model,
        eval_guide,
        *data,
        num_particles=args.ref_particles,
        blocks=args.ref_blocks,
        eval_particles=args.ref_particles,
        max_particles=max(128, args.ref_particles),
        seed=10_000,
    )
    ref_seconds = time.perf_counter() - clock
    gap = Gap(data, ref.info["theta"].detach().clone(), eval_guide, args.gap_chunks, args.gap_particles)
    print(f"  reference: {ref.message}", flush=True)

    nuts = None
    try:
        import numpyro  # noqa: F401
    except ImportError:
        print("  NumPyro not installed: NUTS row skipped", flush=True)
    else:
        nuts = nuts_seconds(x, y)
        print(f"  NumPyro NUTS: {nuts:.1f} s", flush=True)

    fmt = lambda v, i: "never" if v is None else (f"{v[0]}" if i == 0 else f"{v[1]:.2f}")  # noqa: E731
    starts = {
        "mode": "the Laplace-marginal mode (the guide's default start)",
        "prior": "the prior medians (`init_to_mode=False`)",
    }
    lines = [
        f"### Hierarchical logistic, AmortizedLaplaceGuide ({args.groups:,} groups × 10 observations, "
        "4 globals)\n",
        f"Reference θ*: `fit_newton`, {args.ref_particles} particles × {args.ref_blocks} blocks "
        f"({ref_seconds:.1f} s): {ref.message}. Gaps by common random numbers, {args.gap_chunks} × "
        f"{args.gap_particles} antithetic particles. Evaluations (loss-and-gradient evaluations: Adam's "
        "iterations; Newton's line-search trials and final estimate included) and seconds (guide set-up "
        "included) to *first* reach within 1 / 0.1 nat, and from which the gap *stays* within 0.1 nat at "
        "every later checkpoint; ms / evaluation excludes the set-up. `curvi.fit` default is "
        "`curvi.fit(model, guide, *data)` with no options (the guide's `LaplaceNewton()`: 8 antithetic "
        "particles, 3 blocks); `fit_newton` 1 block is the same with `blocks=1`.\n",
    ]
    stats = {}
    for start in args.starts:
        start_gap = gap(next(t for k, t in runs.items() if k[0] == start)[1][0][2])[0]
        lines += [
            f"From {starts[start]}: gap {start_gap:,.3f} nat at evaluation 0.\n",
            "| method | setting | particles | evals to −1 nat | s | evals to −0.1 nat | s | "
            "stays within 0.1 nat from eval | s | ms / eval | last gap (nat) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, (setup, trajectory) in runs.items():
            if key[0] != start:
                continue
            first, settled, ms, last = stats[key] = summarise(setup, trajectory, gap)
            _, method, setting, particles = key
            shown = str(particles)
            if key in results:
                final = results[key].info.get("num_particles", particles)
                shown = f"{particles}" if final == particles else f"{particles}→{final}"
            lines.append(
                f"| {method} | {setting} | {shown} | {fmt(first[1.0], 0)} | {fmt(first[1.0], 1)} | "
                f"{fmt(first[0.1], 0)} | {fmt(first[0.1], 1)} | {fmt(settled[0.1], 0)} | "
                f"{fmt(settled[0.1], 1)} | {ms:.0f} | {last:+.3f} |"
            )
        lines.append("")
        for key, result in results.items():
            if key[0] == start:
                lines.append(f"- {key[1]} {key[2]}: {result.message}")
        lines.append("")
    if nuts is not None:
        lines.append(
            f"For scale: NumPyro NUTS (non-centred model, jit, 1 chain, 500 + 1 000 draws) took "
            f"{nuts:.1f} s on the same data and machine.\n"
        )

    refit_chunks = max(args.gap_chunks, math.ceil(REFIT_PARTICLES / args.gap_particles))
    refit_particles = refit_chunks * args.gap_particles
    lines.append(
        "The default path, from the Laplace-marginal mode, "
        f"{args.repeats} run{'s' if args.repeats > 1 else ''} per dtype: guide set-up + "
        "`curvi.fit(model, guide, *data)` with no options (timed); then a second default "
        "`curvi.fit` from the fitted guide (timed apart) and the ELBO change from the first "
        f"fit's θ̂ to the second's, by common random numbers ({refit_chunks} × "
        f"{args.gap_particles} = {refit_particles} antithetic particles, ± its standard error "
        "over the chunks). Gaps to θ* as above.\n"
    )
    lines.append(
        "| dtype | set-up + fit s (runs) | median s | of which set-up (median) | evaluations | "
        "gaps (nat) | second fit: evaluations | s | ELBO change (nat) |"
    )
    lines.append("|---|---|---:|---:|---|---|---|---|---|")
    summary, notes = [], []
    for dtype, rs in timings.items():
        totals = [r["total"] for r in rs]
        refit_seconds = [r["refit_seconds"] for r in rs]
        gaps = [gap(r["theta"])[0] for r in rs]
        changes = [gap.change(r["theta"], r["refit_theta"], refit_chunks) for r in rs]
        median = statistics.median(totals)
        lines.append(
            f"| {dtype} | {', '.join(f'{t:.2f}' for t in totals)} | {median:.2f} | "
            f"{statistics.median(r['setup'] for r in rs):.2f} | "
            f"{', '.join(str(r['evaluations']) for r in rs)} | {', '.join(f'{g:.3f}' for g in gaps)} | "
            f"{', '.join(str(r['refit_evaluations']) for r in rs)} | "
            f"{', '.join(f'{s:.2f}' for s in refit_seconds)} | "
            f"{', '.join(f'{c:+.3f} ± {s:.3f}' for c, s in changes)} |"
        )
        notes += [
            f"- {dtype}, run {i + 1}, first fit: {r['message']}; second fit: {r['refit_message']}"
            for i, r in enumerate(rs)
        ]
        met = median <= 2.0 and max(gaps) <= 0.1
        summary.append(
            f"- Hierarchical, {args.groups:,} groups, {dtype}: set-up + `curvi.fit` (default) "
            f"median {median:.2f} s, {statistics.median(r['evaluations'] for r in rs):.0f} "
            f"evaluations, worst gap {max(gaps):.3f} nat (target ≤ 2 s within 0.1 nat: "
            f"{'met' if met else 'missed'})."
        )
        worst = max(abs(c) for c, _ in changes)
        summary.append(
            f"- Hierarchical, {args.groups:,} groups, {dtype}: a second `curvi.fit` from the "
            f"fitted guide changes the {refit_particles}-particle ELBO by "
            f"{', '.join(f'{c:+.3f}' for c, _ in changes)} nat (largest |change| {worst:.3f}; "
            f"target < 0.5 nat: {'met' if worst < 0.5 else 'missed'})."
        )
    lines += [""] + notes

    for start in args.starts:
        for level, name in ((1.0, "first within 1 nat"), (0.1, "stays within 0.1 nat")):
            pick = (lambda v: v[0][level]) if level == 1.0 else (lambda v: v[1][level])  # noqa: B023, E731
            parts = []
            for method, setting in NEWTON:
                mine = pick(stats[(start, method, setting, 8)])
                parts.append(
                    f"{method} {setting} "
                    + (f"at evaluation {mine[0]} ({mine[1]:.2f} s)" if mine else "never")
                )
            ours = pick(stats[(start, *NEWTON[0], 8)])
            for particles in (1, 8):
                adam = [
                    (k, v)
                    for k, v in stats.items()
                    if k[0] == start and k[1] == "Adam" and k[3] == particles and pick(v)
                ]
                best = min(adam, key=lambda kv: pick(kv[1])[0]) if adam else None
                if best:
                    it, t = pick(best[1])
                    text = (
                        f"best Adam with {particles} particle(s) ({best[0][2]}) at iteration {it} ({t:.2f} s)"
                    )
                    if ours and ours[0] > 0:
                        text += (
                            f", {it / ours[0]:.1f}× the default's evaluations and {t / ours[1]:.1f}× its time"
                        )
                else:
                    most = max(
                        (
                            len(t) - 1
                            for k, (_, t) in runs.items()
                            if k[0] == start and k[1] == "Adam" and k[3] == particles
                        ),
                        default=0,
                    )
                    text = f"no Adam run with {particles} particle(s) within its budget ({most} iterations)"
                parts.append(text)
            summary.append(f"- Hierarchical from the {start} start, {name}: {'; '.join(parts)}.")
    return "\n".join(lines), summary
