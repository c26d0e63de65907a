"""Part of ``benchmarks/natural.py``: the default fit of AmortizedLaplaceGuide
as the number of groups grows.

Model and data: ``benchmarks/common.py`` (hierarchical logistic: 4 globals,
a random intercept and slope per group, 10 Bernoulli observations per
group), ``simulate(N, seed=0)`` for each N of ``--sizes``, float64. For each
N, ``--scaling-repeats`` runs of what a user does:

* the guide's set-up -- ``AmortizedLaplaceGuide(model, unit_plate="groups")``
  and its first call, which finds the mode of the Laplace marginal (θ̂'s
  start) and the groups' modes;
* ``curvi.fit(model, guide, *data)`` with no options -- the guide's
  ``LaplaceNewton()``, which stops by itself.

Reported (the median run; each run's message): set-up seconds, fit seconds,
loss-and-gradient evaluations, Newton iterations, seconds per evaluation,
the final ELBO ± its Monte Carlo SE, θ̂'s Monte Carlo error (posterior sds)
and the process's peak resident memory. Each N runs in its own process
(``python benchmarks/natural_scaling.py --worker N``) under a time limit
(``--scaling-timeout``), after a small warm-up fit, so that a size that runs
out of memory or time is reported as such. The targets: the number of
evaluations does not grow with N (counted as met when the median counts
of all sizes that finished are within a factor 1.5 of each other), set-up +
fit ≤ 20 s at 10⁵ groups and ≤ 4 minutes at 10⁶.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = {100_000: 20.0, 1_000_000: 240.0}  # groups: seconds of set-up + fit
SPREAD = 1.5  # evaluations "independent of N": within this factor of each other


# ------------------------------------------------------------------ worker
def worker(num_groups, repeats, threads):
    """Runs in its own process: JSON of the runs on the last stdout line;
    progress on stderr."""
    import warnings

    import pyro
    import torch
    from common import simulate, torch_model

    import curvi

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    def new_guide(data):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        clock = time.perf_counter()
        guide = curvi.AmortizedLaplaceGuide(torch_model, unit_plate="groups")
        with pyro.poutine.block():
            guide(*data)
        return guide, time.perf_counter() - clock

    small = tuple(torch.tensor(a) for a in simulate(100, seed=1)[:2])
    curvi.fit(torch_model, new_guide(small)[0], *small, progress=False)  # warm-up
    clock = time.perf_counter()
    data = tuple(torch.tensor(a) for a in simulate(num_groups, seed=0)[:2])
    log(f"data simulated ({time.perf_counter() - clock:.1f} s)")
    runs = []
    for r in range(repeats):
        guide, setup = new_guide(data)
        log(f"run {r + 1}/{repeats}: guide set-up {setup:.2f} s")
        started = time.perf_counter()

        def callback(evaluations, elbo):
            if evaluations % 5 == 0:
                log(
                    f"run {r + 1}/{repeats}: {evaluations} evaluations, "  # noqa: B023
                    f"{time.perf_counter() - started:.1f} s, ELBO {elbo:.6g}"  # noqa: B023
                )

        result = curvi.fit(torch_model, guide, *data, progress=False, callback=callback)
        seconds = time.perf_counter() - started
        info = result.info
        runs.append(
            {
                "setup": setup,
                "fit": seconds,
                "evaluations": result.num_evaluations,
                "iterations": info.get("num_iterations"),
                "elbo": result.final_elbo,
                "elbo_se": result.final_elbo_se,
                "theta_se": info.get("theta_se"),
                "particles": info.get("num_particles"),
                "converged": result.converged,
                "message": result.message,
            }
        )
        log(f"run {r + 1}/{repeats}: fit {seconds:.2f} s, {result.message}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"runs": runs, "peak_mb": peak_mb}))


# ------------------------------------------------------------------ driver
def measure(num_groups, args):
    """One size in its own process; the worker's progress is relayed live."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(num_groups),
        "--repeats",
        str(args.scaling_repeats),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    errors = []
    with tempfile.TemporaryFile(mode="w+") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)

        def relay():
            for line in proc.stderr:
                errors.append(line.rstrip())
                print(f"    [N = {num_groups:,}] {line.rstrip()}", flush=True)

        thread = threading.Thread(target=relay, daemon=True)
        thread.start()
        try:
            proc.wait(timeout=args.scaling_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"skip": f"over the time limit of {args.scaling_timeout:.0f} s"}
        finally:
            thread.join(timeout=5)
        stdout.seek(0)
        out = stdout.read()
    if proc.returncode != 0:
        if proc.returncode < 0:
            return {
                "skip": f"killed by signal {-proc.returncode}"
                + (" (out of memory?)" if proc.returncode == -9 else "")
            }
        # the exception's line (pyro appends the trace's shapes after it)
        raised = [e for e in errors if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", e)]
        tail = (raised or [e for e in errors if e.strip()] or ["?"])[-1].replace("|", "/")
        if any(s in tail.lower() for s in ("out of memory", "memoryerror", "can't allocate memory")):
            return {"skip": f"out of memory: {tail[:120]}"}
        return {"skip": f"failed: {tail[:120]}"}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"skip": "failed: no result from the worker"}


def _median_run(runs):
    """The run of median set-up + fit seconds."""
    ordered = sorted(runs, key=lambda r: r["setup"] + r["fit"])
    return ordered[(len(ordered) - 1) // 2]


def run(args):
    """Markdown section and target lines of the scaling part."""
    rows = []
    for n in args.sizes:
        print(f"  scaling: N = {n:,} (limit {args.scaling_timeout:.0f} s)", flush=True)
        clock = time.perf_counter()
        r = measure(n, args)
        rows.append((n, r))
        print(
            f"  scaling: N = {n:,} "
            + (r["skip"] if "skip" in r else "done")
            + f" ({time.perf_counter() - clock:.0f} s with the warm-up)",
            flush=True,
        )

    lines = [
        f"### Default fit against the number of groups (float64, {args.scaling_repeats} "
        f"run{'s' if args.scaling_repeats > 1 else ''} per size, the median shown)\n",
        "Each size in its own process, limit "
        f"{args.scaling_timeout:.0f} s (warm-up, data and all runs). Set-up: the guide's first call "
        "(the Laplace-marginal mode); fit: `curvi.fit(model, guide, *data)` with no options. "
        "Peak memory: the process's resident high-water mark.\n",
        "| N groups | set-up s | fit s | set-up + fit s | evaluations | Newton iterations | "
        "s / evaluation | final ELBO ± SE | θ̂ MC error (sds) | peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    notes, measured = [], {}
    for n, r in rows:
        if "skip" in r:
            lines.append(f"| {n:,} | – | – | – | – | – | – | {r['skip']} | – | – |")
            continue
        runs = r["runs"]
        m = _median_run(runs)
        total = m["setup"] + m["fit"]
        measured[n] = (total, statistics.median(x["evaluations"] for x in runs), runs)
        evals = ", ".join(str(x["evaluations"]) for x in runs)
        iters = ", ".join(str(x["iterations"]) for x in runs)
        se = m["theta_se"]
        lines.append(
            f"| {n:,} | {m['setup']:.2f} | {m['fit']:.2f} | {total:.2f} | {evals} | {iters} | "
            f"{m['fit'] / max(m['evaluations'], 1):.3f} | {m['elbo']:.6g} ± {m['elbo_se']:.2g} | "
            f"{'–' if se is None or not math.isfinite(se) else f'{se:.2g}'} | {r['peak_mb']:,.0f} |"
        )
        for x in runs:
            notes.append(f"- N = {n:,}: {x['message']}")
    lines += [""] + notes

    summary = []
    if len(measured) >= 2:
        counts = {n: c for n, (_, c, _) in measured.items()}
        low, high = min(counts.values()), max(counts.values())
        ns = sorted(counts)
        slope = ""
        if ns[-1] > ns[0] and low > 0:
            xs = [math.log(n) for n in ns]
            ys = [math.log(counts[n]) for n in ns]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            b = sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
            slope = f"; log-log slope {b:+.3f}"
        met = low > 0 and high <= SPREAD * low
        summary.append(
            "- Scaling: evaluations independent of the number of groups: "
            + ", ".join(f"{counts[n]:g} at {n:,}" for n in ns)
            + slope
            + f" (target: within a factor {SPREAD:g} across sizes: {'met' if met else 'missed'})."
        )
    else:
        summary.append(
            "- Scaling: evaluations independent of the number of groups: fewer than two "
            "sizes finished (not assessed)."
        )
    for n, limit in TARGETS.items():
        shown = f"{limit:.0f} s" if limit < 60 else f"{limit / 60:.0f} minutes"
        if n in measured:
            total = measured[n][0]
            summary.append(
                f"- Scaling, {n:,} groups: set-up + `curvi.fit` {total:.1f} s (median of "
                f"{len(measured[n][2])}; target ≤ {shown}: {'met' if total <= limit else 'missed'})."
            )
        elif n in dict(rows):
            summary.append(f"- Scaling, {n:,} groups: {dict(rows)[n]['skip']} (target ≤ {shown}: missed).")
        else:
            summary.append(f"- Scaling, {n:,} groups: not measured (target ≤ {shown}).")
    return "\n".join(lines), summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=int, required=True, help="number of groups (run by natural.py)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    worker(args.worker, args.repeats, args.threads)


if __name__ == "__main__":
    main()
