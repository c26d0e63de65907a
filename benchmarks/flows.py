"""Benchmark: exact Hessians of flow log densities, 64 points at a time.

Time per batch of ``curvi.log_density_hessian`` against the dense torch
methods, for flows made with Pyro's transforms (float64, d = 10, 50, 200):

* ``realnvp`` -- ``affine_coupling`` · ``permute`` · ``affine_coupling`` ·
  ``permute`` · ``affine_coupling``, hypernets with one hidden layer of
  10·d units (the default of Pyro's ``affine_coupling`` helper);
* ``realnvp-narrow`` -- the same with hidden layers of 2·d units;
* ``nsf`` -- ``affine_coupling`` · ``permute`` · ``spline_coupling``
  (8 bins) · ``permute`` · ``affine_coupling``, one hidden layer of 10·d;
* ``planar`` -- four ``Planar`` layers: no analytic inverse, so no torch
  method can evaluate ``log_prob`` at an arbitrary z; curvi only.

Methods (each returns the (64, d, d) Hessians):

* curvi -- ``log_density_hessian(flow, z)``;
* batched double backward -- one ``torch.autograd.grad`` with
  ``is_grads_batched=True`` over the d rows, whole batch at once;
* ``torch.func.hessian`` and ``jacrev(jacrev)``, vmapped over the batch
  (Pyro's ``Permute.inv_permutation`` computed beforehand: computed lazily
  inside ``torch.func`` it breaks every later call);
* ``torch.autograd.functional.hessian`` per point, ``vectorize=True`` and
  the plain loop.

"best dense" is the fastest non-curvi method of the same run; the error is
the largest absolute difference from the batched double backward (or, where
that fails, ``autograd.functional``). Each time is the best of several
calls after a warm-up; per-point loops stop after a time budget and are
extrapolated to 64 points; a peer predicted (from its previous size, as
d³) to exceed the cell limit is skipped.

Usage::

    python benchmarks/flows.py --threads 1     # full table -> benchmarks/results/flows.md
    python benchmarks/flows.py --quick         # d = 10, 50; printed only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch

SIZES = [10, 50, 200]
QUICK_SIZES = [10, 50]
FLOWS = ["realnvp", "realnvp-narrow", "nsf", "planar"]
BATCH = 64
METHODS = [
    "curvi",
    "batched double backward",
    "torch.func.hessian (vmap)",
    "torch.func jacrev∘jacrev (vmap)",
    "autograd.functional (vectorize=True)",
    "autograd.functional (loop)",
]
RESULTS = Path(__file__).parent / "results" / "flows.md"


# -------------------------------------------------------------------- flows
def build(flow, d, seed=0):
    torch.manual_seed(seed)
    wide = [10 * d]
    if flow == "planar":
        layers = [T.Planar(d) for _ in range(4)]
    else:
        hidden = [2 * d] if flow == "realnvp-narrow" else wide
        middle = (
            T.spline_coupling(d, hidden_dims=wide, count_bins=8)
            if flow == "nsf"
            else T.affine_coupling(d, hidden_dims=hidden)
        )
        layers = [
            T.affine_coupling(d, hidden_dims=hidden),
            T.permute(d),
            middle,
            T.permute(d),
            T.affine_coupling(d, hidden_dims=hidden),
        ]
    base = dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1)
    q = dist.TransformedDistribution(base, layers)
    with torch.no_grad():
        z = q.sample((BATCH,)).detach().clone()
    return q, z


# ------------------------------------------------------------------ methods
def batched_double_backward(q, z):
    d = z.shape[-1]
    x = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(q.log_prob(x).sum(), x, create_graph=True)
    rows = torch.eye(d, dtype=z.dtype).unsqueeze(1).expand(d, *z.shape)
    (H,) = torch.autograd.grad(g, x, rows, is_grads_batched=True)
    return H.transpose(0, 1)


def torch_func(q, z, kind):
    for t in q.transforms:  # the Permute pitfall (module docstring)
        if isinstance(t, T.Permute):
            _ = t.inv_permutation
    fn = (
        torch.func.hessian(q.log_prob)
        if kind == "hessian"
        else torch.func.jacrev(torch.func.jacrev(q.log_prob))
    )
    with pyro.validation_enabled(False):
        return torch.vmap(fn)(z)


def batch_method(method, q, z):
    from curvi import log_density_hessian

    if method == "curvi":
        return lambda: log_density_hessian(q, z)
    if method == "batched double backward":
        return lambda: batched_double_backward(q, z)
    if method.startswith("torch.func.hessian"):
        return lambda: torch_func(q, z, "hessian")
    if method.startswith("torch.func jacrev"):
        return lambda: torch_func(q, z, "jacrev")
    return None


def point_method(method, q):
    vectorize = "vectorize" in method
    return lambda zi: torch.autograd.functional.hessian(q.log_prob, zi, vectorize=vectorize)


# ------------------------------------------------------------------- timing
def timed_batch(fn, budget):
    """Best of several calls after a warm-up (one cold call if that alone is
    over the budget)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    if first > budget:
        return first, result, "1 call"
    repeats = int(min(7, max(2, budget / max(first, 1e-6))))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result, f"best of {repeats}"


def timed_points(fn, z, budget):
    """A per-point loop: run points until the budget is spent, extrapolate to the batch."""
    fn(z[0])  # warm-up
    out, start = [], time.perf_counter()
    for zi in z:
        out.append(fn(zi))
        if time.perf_counter() - start > budget:
            break
    seconds = (time.perf_counter() - start) * len(z) / len(out)
    note = "" if len(out) == len(z) else f"extrapolated from {len(out)} points"
    return seconds, torch.stack(out), note


def measure(flow, d, args, history):
    q, z = build(flow, d)
    methods = ["curvi"] if flow == "planar" else METHODS
    results = {}
    for method in methods:
        if method in history and method != "curvi":
            d0, s0 = history[method]
            predicted = s0 * (d / d0) ** 3
            if predicted > args.limit:
                results[method] = {"skip": f"~{predicted:,.0f} s predicted"}
                continue
        print(f"{flow:>15} d = {d:<4} {method:<38}", end=" ", flush=True)
        try:
            fn = batch_method(method, q, z)
            if fn is not None:
                seconds, H, note = timed_batch(fn, args.budget)
            else:
                seconds, H, note = timed_points(point_method(method, q), z, args.budget)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this flow is a result
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results[method] = {"skip": f"fails: {type(e).__name__}: {msg[:70]}"}
            print(results[method]["skip"], flush=True)
            continue
        results[method] = {"seconds": seconds, "H": H.detach(), "note": note}
        history[method] = (d, seconds)
        print(f"{1e3 * seconds:10.2f} ms  {note}", flush=True)
    reference = next(
        (
            results[m]["H"]
            for m in (
                "batched double backward",
                "autograd.functional (loop)",
                "autograd.functional (vectorize=True)",
            )
            if "H" in results.get(m, {})
        ),
        None,
    )
    for r in results.values():
        if "H" in r and reference is not None:
            n = min(len(r["H"]), len(reference))
            r["error"] = float((r["H"][:n] - reference[:n]).abs().max())
        if "H" in r:
            r["scale"] = float(r["H"].abs().max())
            del r["H"]
    return results


# ------------------------------------------------------------------- report
def format_table(rows):
    lines = [
        "| flow | d | method | ms per batch of 64 | time / best dense | max abs error | notes |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for flow, d, results in rows:
        dense = [r["seconds"] for m, r in results.items() if m != "curvi" and "seconds" in r]
        best = min(dense) if dense else None
        for method, r in results.items():
            if "skip" in r:
                lines.append(f"| {flow} | {d} | {method} | – | – | – | skipped: {r['skip']} |")
                continue
            ratio = f"{r['seconds'] / best:.2f}" if best else "–"
            if method == "curvi" and best:
                ratio += f" (**{best / r['seconds']:.1f}× faster**)"
            err = f"{r['error']:.1e}" if "error" in r else "–"
            note = r["note"] + (f"; max abs H = {r['scale']:.3g}" if method == "curvi" else "")
            lines.append(
                f"| {flow} | {d} | {method} | {1e3 * r['seconds']:.2f} | {ratio} | {err} | "
                f"{note.strip('; ')} |"
            )
    return "\n".join(lines)


NAMED = ("torch.func.hessian (vmap)", "autograd.functional (vectorize=True)", "autograd.functional (loop)")


def summary(rows):
    """The target of the issue (≥ 5× the best dense torch method at d = 50),
    against every peer and against the methods the issue names."""
    out = []
    for flow, d, results in rows:
        if d != 50 or "seconds" not in results.get("curvi", {}):
            continue
        c = results["curvi"]
        dense = {m: r["seconds"] for m, r in results.items() if m != "curvi" and "seconds" in r}
        if not dense:
            out.append(
                f"- {flow}, d = 50: curvi {1e3 * c['seconds']:.1f} ms; no dense torch method "
                "can evaluate this flow's log density at arbitrary points."
            )
            continue
        best = min(dense, key=dense.get)
        ratio = dense[best] / c["seconds"]
        line = (
            f"- {flow}, d = 50: curvi {1e3 * c['seconds']:.1f} ms vs best dense ({best}) "
            f"{1e3 * dense[best]:.1f} ms: {ratio:.1f}× ({'meets' if ratio >= 5 else 'misses'} "
            "the 5× target)"
        )
        named = {m: dense[m] for m in NAMED if m in dense}
        if named:
            m = min(named, key=named.get)
            line += f"; {named[m] / c['seconds']:.0f}× faster than the best method the issue names ({m})"
        else:
            line += "; the methods the issue names fail or were skipped (over the limit)"
        out.append(line + f"; max abs error {c.get('error', float('nan')):.1e}.")
    return "\n".join(out)


def header(args):
    threads = torch.get_num_threads()
    cmd = "python benchmarks/flows.py" + (f" --threads {args.threads}" if args.threads else "")
    return (
        "# Hessians of flow log densities: curvi vs dense torch autodiff\n\n"
        f"Batch of {BATCH} points drawn from each flow; float64; hypernets with one hidden layer "
        "of 10·d units (2·d for realnvp-narrow); see the docstring of `benchmarks/flows.py`.\n"
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}; torch threads: {threads}; "
        f"{datetime.date.today().isoformat()}.\n"
        f"Command: `{cmd}`. Times are the best of several calls (budget {args.budget:.0f} s "
        f"per cell, limit {args.limit:.0f} s).\n\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 10, 50 only; no file written")
    parser.add_argument("--sizes", type=int, nargs="*", help="dimensions (no file written)")
    parser.add_argument("--flows", nargs="*", choices=FLOWS, help="flows (no file written)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of repeats per cell")
    parser.add_argument("--limit", type=float, default=120.0, help="skip peers predicted slower")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    rows = []
    for flow in args.flows or FLOWS:
        history = {}
        for d in sizes:
            rows.append((flow, d, measure(flow, d, args, history)))
    text = header(args) + format_table(rows) + "\n\n" + summary(rows) + "\n"
    print("\n" + text)
    if not (args.quick or args.sizes or args.flows):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
