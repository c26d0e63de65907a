"""Benchmark: natural-gradient and Newton optimisers against Pyro's Adam.

Three parts, each described in its module:

* ``logistic`` (``benchmarks/natural_logistic.py``) -- the Bayesian learning
  rule (``curvi.NaturalGradient``) for a full-covariance Gaussian guide on
  logistic regression: Pima (real, bundled) and simulated d = 50, n = 2 000;
* ``hierarchical`` (``benchmarks/natural_hierarchical.py``) -- sample-average
  Newton for ``AmortizedLaplaceGuide`` (``curvi.fit`` with no options, and
  ``fit_newton`` with one block) against Adam on the hierarchical logistic
  model of ``benchmarks/common.py`` at 10 000 groups; the default path's
  targets (≤ 2 s to within 0.1 nat; a second fit changes the ELBO by
  < 0.5 nat); NumPyro's NUTS for scale when NumPyro is installed;
* ``scaling`` (``benchmarks/natural_scaling.py``) -- the default
  ``curvi.fit`` of that guide at 10⁴, 10⁵ and 10⁶ groups, each size in its
  own process with a time limit: set-up and fit seconds, evaluations
  (target: independent of the number of groups), ≤ 20 s at 10⁵ and
  ≤ 4 minutes at 10⁶.

The first two report evaluations and seconds to within 1 and 0.1 nat of
the optimal ELBO against Adam with 1 and 8 particles at several learning
rates (all listed; the best in bold or named).

Usage::

    python benchmarks/natural.py --threads 2                     # all parts -> benchmarks/results/natural.md
    python benchmarks/natural.py --threads 2 --part hierarchical # one part; the others' sections kept
    python benchmarks/natural.py --threads 2 --part scaling --sizes 10000 100000 1000000
    python benchmarks/natural.py --part logistic --quick         # Pima only, fewer iterations; printed only
    python benchmarks/natural.py --part scaling --sizes 300 1000 --out /tmp/natural.md   # a check

Running one part rewrites that part's section of the results file
(``--out``, default ``benchmarks/results/natural.md``) and keeps the
others'.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).parent / "results" / "natural.md"
PARTS = ("logistic", "hierarchical", "scaling")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS + ("all",), default="all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="logistic: Pima only, short runs; nothing written"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    logistic = parser.add_argument_group("logistic")
    logistic.add_argument("--adam-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    logistic.add_argument("--hessian-lrs", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 1.0])
    logistic.add_argument("--gradient-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    logistic.add_argument("--max-iters", type=int, default=5000)
    logistic.add_argument("--max-seconds", type=float, default=30.0)
    logistic.add_argument("--eval-particles", type=int, default=4000)
    logistic.add_argument("--ref-samples", type=int, default=32)
    logistic.add_argument("--ref-iters", type=int, default=60)
    hier = parser.add_argument_group("hierarchical")
    hier.add_argument("--groups", type=int, default=10_000)
    hier.add_argument("--hier-adam-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    hier.add_argument("--hier-max-iters", type=int, default=400)
    hier.add_argument("--hier-max-seconds", type=float, default=40.0)
    hier.add_argument("--starts", nargs="+", choices=["mode", "prior"], default=["mode", "prior"])
    hier.add_argument("--ref-particles", type=int, default=128)
    hier.add_argument("--ref-blocks", type=int, default=4)
    hier.add_argument("--gap-particles", type=int, default=32)
    hier.add_argument("--gap-chunks", type=int, default=2)
    hier.add_argument("--repeats", type=int, default=3, help="runs of the default path per dtype")
    scaling = parser.add_argument_group("scaling")
    scaling.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="numbers of groups"
    )
    scaling.add_argument("--scaling-repeats", type=int, default=1, help="runs per size (the median shown)")
    scaling.add_argument(
        "--scaling-timeout",
        type=float,
        default=900.0,
        help="seconds per size (its own process) before it is reported as over time",
    )
    args = parser.parse_args()
    if args.quick:
        args.max_iters, args.eval_particles, args.ref_samples = 1000, 1000, 16

    import pyro
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = PARTS if args.part == "all" else (args.part,)
    sections = {}
    for part in parts:
        if part == "logistic":
            import natural_logistic

            text, summary = natural_logistic.run(args)
        elif part == "scaling":
            import natural_scaling

            text, summary = natural_scaling.run(args)
        else:
            import natural_hierarchical

            hier_args = argparse.Namespace(**vars(args))
            hier_args.adam_lrs, hier_args.max_iters = args.hier_adam_lrs, args.hier_max_iters
            hier_args.max_seconds = args.hier_max_seconds
            text, summary = natural_hierarchical.run(hier_args)
        machine = (
            f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, pyro {pyro.__version__}; torch threads {torch.get_num_threads()}; "
            f"{datetime.date.today().isoformat()}. Command: `python benchmarks/natural.py "
            f"{' '.join(sys.argv[1:])}`."
        )
        sections[part] = (
            f"<!-- part: {part} -->\n## {part.capitalize()}\n\n{machine}\n\n{text}\n\n"
            f"#### Targets\n\n" + "\n".join(summary) + f"\n<!-- end: {part} -->"
        )
        print("\n" + sections[part], flush=True)
    if args.quick:
        return
    out = args.out
    old = out.read_text() if out.exists() else ""
    for part in PARTS:
        if part not in sections:
            found = re.search(rf"<!-- part: {part} -->.*?<!-- end: {part} -->", old, re.S)
            if found:
                sections[part] = found.group(0)
    reading = re.search(r"\n## Reading\n.*", old, re.S)  # hand-written commentary, kept
    text = (
        "# Natural-gradient and Newton optimisers against Adam\n\n"
        "Set-up of each part in its module's docstring (`benchmarks/natural_logistic.py`, "
        "`benchmarks/natural_hierarchical.py`, `benchmarks/natural_scaling.py`).\n\n"
        + "\n\n".join(sections[p] for p in PARTS if p in sections)
        + "\n"
        + (reading.group(0) if reading else "")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
