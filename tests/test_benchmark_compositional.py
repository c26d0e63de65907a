"""benchmarks/compositional.py runs: one tiny configuration of each problem
(a few iterations, one seed), so that a change that breaks the benchmark is
caught here rather than at the next full run; and its VAE evaluation is the
ELBO of the Pyro model and guide it trains."""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compositional.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_compositional", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_args(**changes):
    args = dict(quick=True, iterations=2, seeds=1, adam_lrs=[1e-3], modes=["staged"], extras=False, out=None)
    args.update(changes)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("problem", ["vae2", "flow", "flowjoint"])
def test_tiny_run_writes_a_table(bench, problem):
    torch.set_default_dtype(torch.float32)
    lines = []
    section, verdict = bench.run_problem(problem, tiny_args(), log=lambda *a, **k: lines.append(a))
    assert "| method |" in section and "Adam lr=0.001" in section
    assert len(lines) == len(bench.methods([1e-3], ["staged"]))
    if bench.compositional_available() is None:
        assert "staged" in section and any("staged" in v for v in verdict)
    assert "nan" not in section.lower()


def test_vae_evaluation_is_the_pyro_elbo(bench):
    """The direct per-image test ELBO equals Pyro's Trace_ELBO of the benchmark's own
    model and guide on the test images (divided by the plate's scale), to MC error."""
    torch.set_default_dtype(torch.float32)
    problem = bench.VAEProblem(2)
    model, guide = problem.build(seed=0)
    elbo, iwae = problem.evaluate(guide)
    assert math.isfinite(elbo) and iwae >= elbo
    index = torch.arange(len(problem.test))
    pyro.set_rng_seed(1)
    loss = Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1).loss(
        model, guide, problem.test, index
    )
    assert -loss / problem.num_data == pytest.approx(elbo, abs=0.1)
