"""Benchmark: time for AmortizedLaplaceGuide to get within 0.1 nat of its
optimal ELBO with the sample-average Newton fit (``curvi.natural.fit_newton``).

Model and data: ``benchmarks/common.py`` (hierarchical logistic, random
intercept and slope, 10 observations per group, ``simulate(N, seed=0)``).

1. After an untimed warm-up on 100 groups, the guide's set-up (its first call: the mode of the Laplace marginal and
   the units' modes) is timed, then ``fit_newton`` with the given particles
   and blocks; the clock covers both, without the final ELBO estimate
   (``eval_particles = num_particles``, the cheapest allowed).
2. The reference optimum θ* is ``fit_newton`` continued from there with
   ``--ref-particles`` particles and ``--ref-blocks`` blocks (θ̂ averaged
   over blocks).
3. The gap ``ELBO(θ*) − ELBO(θ̂)`` is estimated with common random numbers:
   the same antithetic noise (``FixedNoise``) at both points, ``--gap-chunks``
   chunks of ``--gap-particles`` particles, its SE from the chunk
   differences. θ̂ and θ* are also compared in posterior sds of q(θ).

Usage::

    python benchmarks/natural.py --groups 10000 --particles 16 32 --blocks 2 3 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import simulate, torch_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--particles", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ref-particles", type=int, default=256)
    parser.add_argument("--ref-blocks", type=int, default=4)
    parser.add_argument("--gap-particles", type=int, default=64)
    parser.add_argument("--gap-chunks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import pyro

    from curvi import AmortizedLaplaceGuide
    from curvi.natural import FixedNoise, fit_newton, particle_elbos

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    warnings.simplefilter("ignore")
    x, y, *_ = simulate(args.groups, seed=0)
    data = (torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype))

    def new_guide():
        pyro.clear_param_store()
        guide = AmortizedLaplaceGuide(torch_model, unit_plate="groups")
        start = time.perf_counter()
        with pyro.poutine.block():
            guide(*data)
        return guide, time.perf_counter() - start

    # warm-up on a small data set (torch's and Pyro's one-time costs), untimed
    xs, ys, *_ = simulate(100, seed=1)
    pyro.clear_param_store()
    small = (torch.tensor(xs, dtype=dtype), torch.tensor(ys, dtype=dtype))
    fit_newton(torch_model, AmortizedLaplaceGuide(torch_model, unit_plate="groups"), *small,
               num_particles=4, blocks=1)

    runs = []
    for K in args.particles:
        for B in args.blocks:
            guide, setup = new_guide()
            start = time.perf_counter()
            result = fit_newton(torch_model, guide, *data, num_particles=K, blocks=B,
                                eval_particles=K, seed=args.seed)
            seconds = time.perf_counter() - start
            runs.append((K, B, setup, seconds, result))
            print(f"K={K:4d} blocks={B}: set-up {setup:.2f} s + fit {seconds:.2f} s = "
                  f"{setup + seconds:.2f} s; {result.evaluations} evaluations; {result.message}",
                  flush=True)

    guide, setup = new_guide()
    theta0 = guide.loc_global_unconstrained.detach().clone()
    start = time.perf_counter()
    ref = fit_newton(torch_model, guide, *data, num_particles=args.ref_particles,
                     blocks=args.ref_blocks, eval_particles=args.ref_particles, seed=10_000)
    print(f"reference ({time.perf_counter() - start:.1f} s): {ref.message}", flush=True)
    theta_star = ref.theta
    S = guide.last_global_precision

    def gap(theta):
        diffs = []
        param = guide.loc_global_unconstrained
        for c in range(args.gap_chunks):
            values = []
            for point in (theta_star, theta):
                with torch.no_grad():
                    param.copy_(point)
                    with FixedNoise(20_000 + c):
                        values.append(particle_elbos(torch_model, guide, *data,
                                                     num_particles=args.gap_particles,
                                                     max_plate_nesting=2).mean().item())
            diffs.append(values[0] - values[1])
        return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))

    def sds(theta):
        d = theta - theta_star
        return math.sqrt((d @ S @ d).item())

    g0, se0 = gap(theta0)
    print(f"start (Laplace-marginal mode): gap {g0:.3f} ± {se0:.3f} nat, {sds(theta0):.3f} sds from θ*")
    for K, B, setup, seconds, result in runs:
        g, se = gap(result.theta)
        print(f"K={K:4d} blocks={B}: {setup + seconds:.2f} s, gap {g:.3f} ± {se:.3f} nat, "
              f"{sds(result.theta):.3f} sds from θ*")


if __name__ == "__main__":
    main()
