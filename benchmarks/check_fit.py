"""Benchmark: what the default fit's bias check (``check_fit``) adds to the fit.

The hierarchical logistic model (``benchmarks/common.py``) at 10⁴ and 10⁵
groups: ``curvi.fit(model, AmortizedLaplaceGuide(model, unit_plate="groups"))``
with no options, then the same fit with the check turned off
(``guide.bias_tolerance = None``) in the same run, and the check alone.

Usage::

    python benchmarks/check_fit.py   # -> benchmarks/results/check_fit.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import simulate, torch_model  # noqa: E402

import curvi  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "check_fit.md"


def timed_fit(data, check):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = curvi.AmortizedLaplaceGuide(torch_model, unit_plate="groups")
    if not check:
        guide.bias_tolerance = None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):
        result = curvi.fit(torch_model, guide, *data, progress=False)
    return time.perf_counter() - start, result, guide


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    rows = []
    for n in args.sizes:
        x, y, *_ = simulate(n, seed=0)
        data = (torch.as_tensor(x), torch.as_tensor(y))
        without, _, _ = timed_fit(data, check=False)
        with_check, result, guide = timed_fit(data, check=True)
        start = time.perf_counter()
        note = guide.check_fit(*data)
        alone = time.perf_counter() - start
        said = note.split(" by ")[1].split(" (")[0] if note else "nothing"
        rows.append(
            f"| {n:,} | {without:.2f} | {with_check:.2f} | {alone:.2f} | {alone / without:.1%} | {said} |"
        )
        print(rows[-1], flush=True)
    text = (
        "# The default fit's bias check\n\n"
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}; float64. Command: `python benchmarks/check_fit.py "
        f"{' '.join(sys.argv[1:])}`. Fit: `curvi.fit` with no options (sample-average Newton), once "
        "with the check turned off and once with it (the default), in the same run; then the check "
        "alone at the fitted θ̂. The first fit of each size also pays first-touch costs (so the "
        "two fit times differ by more than the check); the check's own cost is its column.\n\n"
        "| groups | fit without the check (s) | default fit (s) | check alone (s) | check / fit | "
        "what it said |\n|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n"
    )
    print(text)
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
