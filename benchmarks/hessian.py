"""Benchmark: Hessian + factorisation of a hierarchical logistic model.

Model (``benchmarks/common.py``): 4 globals (intercept and slope; the two random-effect sds), a random
intercept and slope per group (k = 2), 10 Bernoulli observations per group.
The Hessian of the unconstrained log joint is evaluated at the simulation's
true values, side by side with the dense peers:

* curvi      -- ``structured_hessian`` (p + k products) + ``ArrowheadPrecision``
* pyro dense -- ``pyro.ops.hessian.hessian`` (what ``AutoLaplaceApproximation`` uses)
* torch.func -- ``torch.func.hessian`` of the flattened log joint
* numpyro    -- jit-compiled ``jax.hessian`` of NumPyro's potential (skipped
  when jax / numpyro are not installed)

Each measurement runs in its own process (peak memory is that process's
high-water mark above its state before the call) with a time limit; a dense
peer is skipped where its matrix would not fit in memory or where its time,
extrapolated from the previous size, exceeds the limit. Every method also
returns H·v for a fixed v, compared with curvi's as a correctness check.

Usage::

    python benchmarks/hessian.py            # full table -> benchmarks/results/hessian.md
    python benchmarks/hessian.py --quick    # N = 200, 800 only, printed
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OBS_PER_GROUP, numpyro_model, simulate, torch_model  # noqa: E402  (shared model and data)

SIZES = [200, 800, 3200, 100_000, 1_000_000]
QUICK_SIZES = [200, 800]
METHODS = ["curvi", "pyro dense", "torch.func", "numpyro"]
DENSE = {"pyro dense", "torch.func", "numpyro"}
RESULTS = Path(__file__).parent / "results" / "hessian.md"


# ------------------------------------------------------------------ workers
def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats):
    """Best wall time of ``repeats`` calls after one warm-up (``repeats=0``: a
    single cold call, for peers too slow to repeat); returns (time, result)."""
    if repeats == 0:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def work_torch(method, num_groups, dtype_name):
    import pyro
    import torch

    from curvi import ModelView
    from curvi.hessian import gradient, structured_hessian

    dtype = getattr(torch, dtype_name)
    x, y, theta, u, probe = (torch.tensor(a, dtype=dtype) for a in simulate(num_groups))
    view = ModelView(torch_model, x, y, unit_plate="groups")
    repeats = 3 if num_groups <= 100_000 else 1
    baseline = _rss_mb()
    out = {}
    if method == "curvi":
        out["grad_seconds"], _ = _timed(lambda: gradient(view, theta, u), repeats)
        baseline = _rss_mb()
        out["hessian_seconds"], H = _timed(lambda: structured_hessian(view, theta, u), repeats)

        def factor():
            try:
                return H.precision().cholesky, "none"
            except ValueError:  # not positive definite at this point
                return H.precision(repair="softabs").cholesky, "softabs"

        out["factor_seconds"], (_, out["repair"]) = _timed(factor, repeats)
        out["seconds"] = out["hessian_seconds"] + out["factor_seconds"]
        v_theta, v_y = probe[:4], probe[4:].reshape(num_groups, 2)
        hv_theta, hv_y = H.matvec((v_theta, v_y))
        hv = torch.cat([hv_theta, hv_y.reshape(-1)])
    else:
        flat = torch.cat([theta, u.reshape(-1)])

        def flat_log_joint(z):
            return view.log_joint(z[:4], z[4:].reshape(num_groups, 2))

        if method == "pyro dense":
            from pyro.ops.hessian import hessian

            def dense():
                z = flat.clone().requires_grad_()
                with pyro.validation_enabled(False):
                    return hessian(flat_log_joint(z), [z])

            out["seconds"], H = _timed(dense, 0)
        else:
            out["seconds"], H = _timed(lambda: torch.func.hessian(flat_log_joint)(flat), 0)
        hv = H @ probe
    out["peak_mb"] = max(0.0, _peak_mb() - baseline)
    out["hv"] = hv.tolist() if num_groups <= 3200 else None
    return out


def work_numpyro(num_groups, dtype_name):
    import jax

    jax.config.update("jax_enable_x64", dtype_name == "float64")
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree
    from numpyro.infer.util import potential_energy

    x, y, theta, u, probe = simulate(num_groups)
    params = {
        "beta": jnp.asarray(theta[:2]),
        "sigma": jnp.asarray(theta[2:]),
        "u": jnp.asarray(u.reshape(num_groups, 1, 2)),
    }
    flat, unravel = ravel_pytree(params)  # keys sorted: beta, sigma, u -- curvi's order

    def log_joint(z):
        return -potential_energy(numpyro_model, (x, y), {}, unravel(z))

    hess = jax.jit(jax.hessian(log_joint))
    baseline = _rss_mb()
    start = time.perf_counter()
    H = jax.block_until_ready(hess(flat))
    compile_and_run = time.perf_counter() - start
    seconds, H = _timed(lambda: jax.block_until_ready(hess(flat)), 2)
    hv = H @ jnp.asarray(probe)
    return {
        "seconds": seconds,
        "compile_seconds": compile_and_run - seconds,
        "peak_mb": max(0.0, _peak_mb() - baseline),
        "hv": [float(a) for a in hv] if num_groups <= 3200 else None,
    }


def worker(method, num_groups, dtype_name):
    if method == "numpyro":
        out = work_numpyro(num_groups, dtype_name)
    else:
        out = work_torch(method, num_groups, dtype_name)
    print(json.dumps(out))


# ------------------------------------------------------------------- driver
def predicted_cost(method, n, measured):
    """(bytes, seconds) a dense peer will need at ``n`` groups: its own last
    measurement scaled by the square of the dimension (memory of a d×d
    matrix, d backward passes of cost O(N)); before any measurement, the
    matrix alone."""
    d = 4 + 2 * n
    if method not in measured:
        return 8 * d * d, 0.0
    n0, seconds, peak_mb = measured[method]
    growth = (d / (4 + 2 * n0)) ** 2
    return max(8 * d * d, peak_mb * 2**20 * growth), seconds * growth


def run(method, num_groups, args):
    cmd = [sys.executable, __file__, "--worker", method, str(num_groups), "--dtype", args.dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skip": f"over {args.timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skip": f"failed: {tail[:60]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_available(method):
    if method != "numpyro":
        return True
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError:
        return False
    return True


def measure(sizes, args):
    rows, measured = [], {}
    available = {m: peer_available(m) for m in METHODS}
    for m, ok in available.items():
        if not ok:
            print(f"[{m}] not installed (pip install jax numpyro): skipped", flush=True)
    for n in sizes:
        results = {}
        for method in METHODS:
            if not available[method]:
                results[method] = {"skip": "not installed"}
                continue
            if method in DENSE:
                need, seconds = predicted_cost(method, n, measured)
                if need > args.memory_gb * 2**30:
                    results[method] = {"skip": f"~{need / 2**30:,.0f} GB predicted"}
                    continue
                if seconds > args.timeout:
                    results[method] = {"skip": f"~{seconds:,.0f} s predicted"}
                    continue
            print(f"N = {n:>9,}  {method:<11}", end=" ", flush=True)
            r = run(method, n, args)
            results[method] = r
            print(r.get("skip") or f"{r['seconds']:.4g} s", flush=True)
            if "seconds" in r:
                measured[method] = (n, r["seconds"], r["peak_mb"])
        rows.append((n, results))
    return rows


def _max_rel_diff(hv, ref):
    import numpy as np

    hv, ref = np.asarray(hv), np.asarray(ref)
    return float(np.abs(hv - ref).max() / np.abs(ref).max())


def format_table(rows, args):
    lines = [
        "| N groups | dim | method | time (s) | peak extra memory (MB) | time / curvi | "
        "rel. diff of H·v vs curvi | notes |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for n, results in rows:
        ref = results["curvi"]
        for method in METHODS:
            r = results[method]
            dim = f"{4 + 2 * n:,}"
            if "skip" in r:
                lines.append(f"| {n:,} | {dim} | {method} | – | – | – | – | skipped: {r['skip']} |")
                continue
            ratio = r["seconds"] / ref["seconds"] if "seconds" in ref else float("nan")
            diff = (
                f"{_max_rel_diff(r['hv'], ref['hv']):.1e}"
                if method != "curvi" and r.get("hv") and ref.get("hv")
                else "–"
            )
            if method == "curvi":
                notes = (
                    f"Hessian {ref['hessian_seconds']:.3g} s + factor {ref['factor_seconds']:.3g} s"
                    f" (repair: {ref['repair']}); = {ref['hessian_seconds'] / ref['grad_seconds']:.1f}"
                    " gradient evaluations"
                )
            elif method == "numpyro":
                notes = f"jit compile {r['compile_seconds']:.2f} s, not counted"
            else:
                notes = ""
            lines.append(
                f"| {n:,} | {dim} | {method} | {r['seconds']:.4g} | {r['peak_mb']:.0f} | "
                f"{ratio:.1f}× | {diff} | {notes} |"
            )
    return "\n".join(lines)


def summary(rows):
    """One line per target of the issue, read off the table."""
    by_n = dict(rows)
    lines = []
    if 3200 in by_n and "seconds" in by_n[3200]["curvi"]:
        r = by_n[3200]
        line = f"- N = 3 200: curvi {1e3 * r['curvi']['seconds']:.1f} ms (target ≤ 50 ms)"
        for peer in ("numpyro", "pyro dense"):
            if "seconds" in r[peer]:
                line += f"; {r[peer]['seconds'] / r['curvi']['seconds']:,.0f}× faster than {peer}"
        lines.append(line + ".")
    if 1_000_000 in by_n and "seconds" in by_n[1_000_000]["curvi"]:
        c = by_n[1_000_000]["curvi"]
        lines.append(
            f"- N = 1 000 000: curvi {c['seconds']:.2f} s (target ≤ 5 s); the Hessian costs "
            f"{c['hessian_seconds'] / c['grad_seconds']:.1f} gradient evaluations "
            "(target ≤ 3·(p + k) = 18)."
        )
    return "\n".join(lines)


def header(args):
    import torch

    return (
        "# Hessian + factorisation: hierarchical logistic model\n\n"
        f"4 globals, random intercept + slope per group (k = 2), {OBS_PER_GROUP} "
        f"observations per group; {args.dtype}; evaluated at the simulation's true values.\n"
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}.\n"
        f"Each cell runs in its own process; limit {args.timeout:.0f} s per cell. "
        "Regenerate: `python benchmarks/hessian.py`.\n\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 200 and 800 only; no file written")
    parser.add_argument("--sizes", type=int, nargs="*", help="numbers of groups")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per cell")
    parser.add_argument("--memory-gb", type=float, default=16.0, help="skip dense peers above this")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.dtype)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    rows = measure(sizes, args)
    table = header(args) + format_table(rows, args) + "\n\n" + summary(rows) + "\n"
    print("\n" + table)
    if not args.quick and not args.sizes:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
