"""Part of ``benchmarks/natural.py``: Newton steps for AmortizedLaplaceGuide
on the hierarchical logistic model, against Pyro's Adam on the same guide.

Model and data: ``benchmarks/common.py`` (random intercept and slope, 10
observations per group, ``simulate(N, seed=0)``), float64. Every method
starts from the guide's own start (the mode of the Laplace marginal, its
``init_to_mode``) and trains its only parameter θ̂:

* **Adam** -- ``SVI`` + ``Trace_ELBO`` (1 or 8 vectorized particles) +
  ``pyro.optim.Adam`` at each learning rate of ``--adam-lrs``;
* **LaplaceNewton** -- ``SVI`` + ``Trace_ELBO`` + ``curvi.LaplaceNewton``
  (damped Newton steps preconditioned by the guide's S; ``decay 0.5``, what
  ``curvi.fit`` uses for this guide), 1 or 8 particles;
* **fit_newton** -- the sample-average variant (8 antithetic particles,
  noise fixed per block, BFGS-refined S), 1 and 3 blocks; an iteration is a
  loss-and-gradient evaluation (line-search trials included).

θ̂ is recorded after every iteration with the training clock (model
evaluations for the record are off the clock). Afterwards the gap
``ELBO(θ*) − ELBO(θ̂)`` is estimated at iterations 0–10 and then every 25 %
more, by common random numbers (the same antithetic noise at θ* and θ̂,
``--gap-chunks`` × ``--gap-particles`` particles). θ* is ``fit_newton`` with
``--ref-particles`` particles × ``--ref-blocks`` blocks. Reported:
iterations and seconds (the guide's set-up included) to first reach within
1 and 0.1 nat of θ*'s ELBO, ms per iteration, and the last gap.

The timing target (≤ 2 s to within 0.1 nat at 10 000 groups) is measured
separately: guide set-up + ``fit_newton`` (8 antithetic particles, one
block, cheapest final estimate), ``--repeats`` times, float64 and float32,
the median reported with the gap of each result.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch

import pyro
from pyro.infer import SVI, Trace_ELBO

from common import numpyro_model_noncentred, simulate, torch_model

from curvi import AmortizedLaplaceGuide, LaplaceNewton
from curvi.laplace_newton import FixedNoise, fit_newton, particle_elbos


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
    """Trajectory [(iteration, clock, θ̂)] of SVI from the guide's start."""
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


def newton_run(data, start, blocks, particles=8, seed=0):
    guide, setup = new_guide(data, start)
    param = guide.loc_global_unconstrained
    trajectory = [(0, 0.0, param.detach().clone())]
    state = {"paused": 0.0, "start": time.perf_counter(), "evals": 0}

    def callback(block, iteration, elbo):  # after each accepted iteration
        now = time.perf_counter()
        trajectory.append((len(trajectory), now - state["start"] - state["paused"], param.detach().clone()))
        state["paused"] += time.perf_counter() - now

    result = fit_newton(torch_model, guide, *data, num_particles=particles, blocks=blocks,
                        eval_particles=particles, seed=seed, callback=callback)
    clock = time.perf_counter() - state["start"] - state["paused"]
    # the final θ̂ (the blocks' average), at the evaluations fit_newton counted
    trajectory.append((result.evaluations, clock, result.theta.clone()))
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
                return particle_elbos(torch_model, self.guide, *self.data, num_particles=self.particles,
                                      max_plate_nesting=2).mean().item()

    def __call__(self, theta):
        diffs = [ref - self._elbo(theta, c) for c, ref in enumerate(self.reference)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        return statistics.fmean(diffs), se


def summarise(setup, trajectory, gap):
    """For 1 and 0.1 nat: (iteration, seconds) of the first checkpoint within
    it, and of the checkpoint from which every later one stays within it;
    ms per iteration; the last gap."""
    wanted = set(checkpoints(trajectory[-1][0]))
    points = [(it, setup + clock, gap(theta)[0]) for it, clock, theta in trajectory
              if it in wanted or (it, clock) == trajectory[-1][:2]]
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
    import numpyro
    from numpyro.infer import MCMC, NUTS

    jax.config.update("jax_enable_x64", True)
    mcmc = MCMC(NUTS(numpyro_model_noncentred), num_warmup=warmup, num_samples=samples, progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(0), x, y)
    jax.block_until_ready(mcmc.get_samples()["beta"])
    return time.perf_counter() - start


def run(args):
    """Markdown section and target lines of the hierarchical part."""
    warnings.simplefilter("ignore")
    torch.set_default_dtype(torch.float64)
    x, y, *_ = simulate(args.groups, seed=0)
    data = (torch.tensor(x), torch.tensor(y))
    small = tuple(torch.tensor(a) for a in simulate(100, seed=1)[:2])
    fit_newton(torch_model, new_guide(small)[0], *small, num_particles=4, blocks=1)  # warm-up

    # the ≤ 2 s target: set-up + one block of fit_newton, float64 and float32
    timings = {}
    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)
        cast = tuple(a.to(dtype) for a in data)
        fit_newton(torch_model, new_guide(small)[0], *(a.to(dtype) for a in small), num_particles=4, blocks=1)
        runs = []
        for r in range(args.repeats):
            guide, setup = new_guide(cast)
            start = time.perf_counter()
            result = fit_newton(torch_model, guide, *cast, num_particles=8, blocks=1, eval_particles=8, seed=r)
            runs.append((setup + time.perf_counter() - start, setup, result.theta.to(torch.float64)))
            print(f"  timing {dtype}: {runs[-1][0]:.2f} s", flush=True)
        timings[str(dtype).split(".")[-1]] = runs
    torch.set_default_dtype(torch.float64)

    runs = {}
    for start in args.starts:
        for particles in (1, 8):
            for lr in args.adam_lrs:
                runs[(start, "Adam", f"lr {lr:g}", particles)] = svi_run(
                    data, start, lambda g: pyro.optim.Adam({"lr": lr}), particles, args.max_iters,
                    args.max_seconds)
                print(f"  {start}: Adam lr={lr} K={particles} done", flush=True)
            runs[(start, "LaplaceNewton", "decay 0.5", particles)] = svi_run(
                data, start, lambda g: LaplaceNewton(g, decay=0.5), particles, args.newton_iters,
                args.max_seconds)
            print(f"  {start}: LaplaceNewton K={particles} done", flush=True)
        for blocks in (1, 3):
            setup, trajectory, _ = newton_run(data, start, blocks)
            runs[(start, "fit_newton", f"{blocks} block{'s' if blocks > 1 else ''}", 8)] = (setup, trajectory)
            print(f"  {start}: fit_newton blocks={blocks} done", flush=True)

    eval_guide, _ = new_guide(data)
    clock = time.perf_counter()
    ref = fit_newton(torch_model, eval_guide, *data, num_particles=args.ref_particles, blocks=args.ref_blocks,
                     eval_particles=args.ref_particles, seed=10_000)
    ref_seconds = time.perf_counter() - clock
    gap = Gap(data, ref.theta, eval_guide, args.gap_chunks, args.gap_particles)
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
    starts = {"mode": "the Laplace-marginal mode (the guide's default start)",
              "prior": "the prior medians (`init_to_mode=False`)"}
    lines = [
        f"### Hierarchical logistic, AmortizedLaplaceGuide ({args.groups:,} groups × 10 observations, "
        "4 globals)\n",
        f"Reference θ*: `fit_newton`, {args.ref_particles} particles × {args.ref_blocks} blocks "
        f"({ref_seconds:.0f} s): {ref.message}. Gaps by common random numbers, {args.gap_chunks} × "
        f"{args.gap_particles} antithetic particles. Iterations and seconds (guide set-up included) to "
        "*first* reach within 1 / 0.1 nat, and from which the gap *stays* within 0.1 nat at every later "
        "checkpoint; ms / iteration excludes the set-up.\n",
    ]
    stats = {}
    for start in args.starts:
        start_gap = gap(next(t for k, t in runs.items() if k[0] == start)[1][0][2])[0]
        lines += [f"From {starts[start]}: gap {start_gap:,.3f} nat at iteration 0.\n",
                  "| method | setting | particles | iters to −1 nat | s | iters to −0.1 nat | s | "
                  "stays within 0.1 nat from iter | s | ms / iter | last gap (nat) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, (setup, trajectory) in runs.items():
            if key[0] != start:
                continue
            first, settled, ms, last = stats[key] = summarise(setup, trajectory, gap)
            _, method, setting, particles = key
            lines.append(
                f"| {method} | {setting} | {particles} | {fmt(first[1.0], 0)} | {fmt(first[1.0], 1)} | "
                f"{fmt(first[0.1], 0)} | {fmt(first[0.1], 1)} | {fmt(settled[0.1], 0)} | "
                f"{fmt(settled[0.1], 1)} | {ms:.0f} | {last:+.3f} |")
        lines.append("")
    if nuts is not None:
        lines.append(f"For scale: NumPyro NUTS (non-centred model, jit, 1 chain, 500 + 1 000 draws) took "
                     f"{nuts:.1f} s on the same data and machine.\n")
    lines.append("Time to within 0.1 nat, set-up + `fit_newton` (8 antithetic particles, 1 block, from the "
                 f"Laplace-marginal mode), {args.repeats} runs each:\n")
    lines.append("| dtype | total s (runs) | median s | of which set-up (median) | gaps (nat) |")
    lines.append("|---|---|---:|---:|---|")
    summary = []
    for dtype, rs in timings.items():
        totals = [t for t, _, _ in rs]
        gaps = [gap(theta)[0] for _, _, theta in rs]
        median = statistics.median(totals)
        lines.append(f"| {dtype} | {', '.join(f'{t:.2f}' for t in totals)} | {median:.2f} | "
                     f"{statistics.median(s for _, s, _ in rs):.2f} | {', '.join(f'{g:.3f}' for g in gaps)} |")
        met = median <= 2.0 and max(gaps) <= 0.1
        summary.append(f"- Hierarchical, {args.groups:,} groups, {dtype}: set-up + `fit_newton` median "
                       f"{median:.2f} s, worst gap {max(gaps):.3f} nat (target ≤ 2 s within 0.1 nat: "
                       f"{'met' if met else 'missed'}).")
    for start in args.starts:
        for particles in (1, 8):
            for level, name in ((1.0, "first within 1 nat"), (0.1, "stays within 0.1 nat")):
                pick = (lambda v: v[0][level]) if level == 1.0 else (lambda v: v[1][level])  # noqa: E731
                adam = [(k, v) for k, v in stats.items()
                        if k[0] == start and k[1] == "Adam" and k[3] == particles and pick(v)]
                best = min(adam, key=lambda kv: pick(kv[1])[0]) if adam else None
                adam_text = (f"best Adam ({best[0][2]}) at iteration {pick(best[1])[0]} "
                             f"({pick(best[1])[1]:.2f} s)" if best else "no Adam run within its budget")
                for method, setting in (("LaplaceNewton", "decay 0.5"),) + (
                        (("fit_newton", "1 block"),) if particles == 8 else ()):
                    value = stats[(start, method, setting, particles)]
                    ours = pick(value)
                    text = (f"at iteration {ours[0]} ({ours[1]:.2f} s)" if ours else "never within its budget")
                    ratio = ""
                    if ours and best and ours[0] > 0:
                        ratio = f": {pick(best[1])[0] / ours[0]:.1f}× fewer iterations"
                    elif ours and not best:
                        ratio = f": Adam ran {max(t[-1][0] for k, (_, t) in runs.items() if k[0] == start and k[1] == 'Adam' and k[3] == particles)} iterations without"
                    summary.append(f"- Hierarchical from the {start} start, {particles} particle(s), {name}: "
                                   f"{method} {text}, {adam_text}{ratio}.")
    return "\n".join(lines), summary
