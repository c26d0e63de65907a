"""Units over processes (curvi.distributed): two processes on localhost
(gloo) against one, in float64, and what happens when a process fails.

Each run starts ``tests/distributed_worker.py`` in fresh Python processes with
the environment torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so the test needs no launcher and no network beyond loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from curvi import distributed
from curvi.distributed import local_units, unit_normal

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 30  # CURVI_TIMEOUT of the failure runs (seconds)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(task, directory, world_size):
    """Run the worker as ``world_size`` processes; (return codes, logs, seconds)."""
    port = _free_port()
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(world_size):
        env = dict(os.environ, CURVI_TIMEOUT=str(TIMEOUT), OMP_NUM_THREADS="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        if world_size > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = open(os.path.join(directory, f"log{rank}"), "w+")  # noqa: SIM115 (closed below)
        out = os.path.join(directory, f"out{rank}.pt")
        procs.append(subprocess.Popen([sys.executable, WORKER, task, out], env=env, stdout=log, stderr=log))
        logs.append(log)
    codes = [p.wait(timeout=4 * TIMEOUT + 60) for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return codes, texts, time.monotonic() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two processes, each running the whole comparison."""
    results = {}
    for world_size in (1, 2):
        directory = tmp_path_factory.mktemp(f"world{world_size}")
        codes, texts, _ = _launch("agree", directory, world_size)
        assert codes == [0] * world_size, "\n".join(texts)
        results[world_size] = [
            torch.load(os.path.join(directory, f"out{r}.pt"), weights_only=False) for r in range(world_size)
        ]
    return results


def _close(a, b, tol=1e-10):
    a, b = (torch.as_tensor(v, dtype=torch.float64).detach() for v in (a, b))
    return float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max()))


def test_two_processes_compute_the_single_process_elbo_gradient_and_newton_step(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    assert r0["world_size"] == 2
    assert _close(r0["elbo"], one["elbo"])
    assert _close(r0["grad"], one["grad"])
    assert _close(r0["precision"], one["precision"])  # S, all-reduced from the two halves
    assert _close(r0["theta_after_step"], one["theta_after_step"])
    # the collapsed ELBO of quadrature=5, and q(θ) from the marginal's curvature
    for key in ("quadrature", "marginal"):
        assert _close(r0[f"{key}_elbo"], one[f"{key}_elbo"])
        assert _close(r0[f"{key}_grad"], one[f"{key}_grad"])
        assert _close(r0[f"{key}_precision"], one[f"{key}_precision"], 1e-8)  # central differences
    # every process holds the same numbers, bitwise
    for key in ("elbo", "grad", "precision", "theta_after_step"):
        assert torch.equal(torch.as_tensor(r0[key]), torch.as_tensor(r1[key])), key


def test_two_processes_find_the_single_process_mle(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    for name in one["mle"]:
        assert _close(r0["mle"][name], one["mle"][name]), name
        assert torch.equal(r0["mle"][name], r1["mle"][name])
        # standard errors: central differences at L-BFGS's last point, before the Newton polish
        assert _close(r0["mle_se"][name], one["mle_se"][name], 1e-7), name
    assert _close(r0["mle_loglik"], one["mle_loglik"])
    assert r0["mle_nobs"] == one["mle_nobs"] == 37 * 6
    assert r0["mle_modes"].shape == one["mle_modes"].shape  # every unit's modes, gathered
    assert _close(r0["mle_modes"], one["mle_modes"], 1e-7)
    assert r0["mle_summary"] == r1["mle_summary"]

    def table(summary):  # all but how L-BFGS stopped (its iterations differ by rounding)
        return [line for line in summary.splitlines() if "converged" not in line]

    assert table(r0["mle_summary"]) == table(one["mle_summary"])


def test_two_processes_fit_checkpoint_and_resume_as_one(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    assert len(r0["fit_elbo"]) == len(one["fit_elbo"]) == 8
    assert _close(r0["fit_elbo"], one["fit_elbo"])
    assert _close(r0["fit_theta"], one["fit_theta"])
    assert r0["fit_elbo"] == r1["fit_elbo"] and torch.equal(r0["fit_theta"], r1["fit_theta"])
    # the checkpoint holds what one process's does: every unit's warm starts
    mine, theirs = r0["checkpoint"], one["checkpoint"]
    assert mine["step"] == theirs["step"] == 8
    guide, reference = mine["modules"]["guide"], theirs["modules"]["guide"]
    assert guide.keys() == reference.keys()
    for key in guide:
        assert guide[key].shape == reference[key].shape, key
        if guide[key].is_floating_point():
            assert _close(guide[key], reference[key], 1e-9), key
    for name, value in theirs["param_store"]["params"].items():
        assert _close(mine["param_store"]["params"][name], value), name
    # resumed from that file by two processes: the continuation of one process's fit
    assert len(r0["resumed_elbo"]) == 12
    assert _close(r0["resumed_elbo"], one["resumed_elbo"])
    assert _close(r0["resumed_theta"], one["resumed_theta"])


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_process_ends_every_process_with_a_clear_error(tmp_path, how):
    codes, (log0, log1), seconds = _launch(how, tmp_path, 2)
    assert codes[0] != 0 and codes[1] != 0
    assert "RankFailure: rank 0 of 2" in log0 and "failed: another process raised and ended" in log0
    if how == "raise":
        assert "rank 1's model fails on purpose" in log1
    assert seconds < 2 * TIMEOUT + 30  # the peer noticed; nobody waited out a hang


def test_processes_that_did_not_take_local_units_are_refused(tmp_path):
    codes, logs, _ = _launch("unsharded", tmp_path, 2)
    assert codes == [1, 1]
    for log in logs:
        assert "did not take its units from curvi.local_units" in log


def test_what_does_not_sum_over_processes_is_refused_by_name(tmp_path):
    codes, logs, _ = _launch("refusals", tmp_path, 2)
    assert codes == [0, 0], "\n".join(logs)
    messages = torch.load(tmp_path / "out0.pt", weights_only=False)
    assert "outside curvi's losses" in messages["pyro_svi"]
    assert "needs an optimiser that sums its evaluations" in messages["fit_adam"]
    assert "under torch.distributed use AmortizedLaplaceGuide" in messages["laplace_guide"]
    assert "LaplaceMarginal is a model for MCMC in one process" in messages["marginal_nuts"]
    assert "outside curvi's losses" in messages["collapsed_svi"]
    assert "summed out by enumeration, which curvi does not share" in messages["enumerated"]


# ---------------------------------------------------------------------------
# in one process


def test_local_units_is_every_unit_in_one_process():
    assert torch.equal(local_units(7), torch.arange(7))
    assert distributed.world_size() == 1 and not distributed.is_sharded()
    with pytest.raises(ValueError, match="num_units must be a positive integer"):
        local_units(0)


def test_unit_noise_depends_only_on_the_global_unit_index():
    kw = dict(dtype=torch.float64, device="cpu")
    n = 3 * distributed.NOISE_BLOCK + 17
    whole = unit_normal(5, torch.arange(n), (4, n, 1, 2), 1, **kw)
    # any split of the units (here across block boundaries) draws the same noise
    for lo, hi in [(0, 10), (1000, 2100), (n - 5, n)]:
        part = unit_normal(5, torch.arange(lo, hi), (4, hi - lo, 1, 2), 1, **kw)
        assert torch.equal(part, whole[:, lo:hi])
    assert not torch.equal(unit_normal(6, torch.arange(n), (4, n, 1, 2), 1, **kw), whole)
    assert abs(whole.mean().item()) < 0.05 and abs(whole.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="1-d tensor of the 7 global indices"):
        unit_normal(5, torch.arange(6), (4, 7, 2), 1, **kw)
    with pytest.raises(ValueError, match="not an axis"):
        unit_normal(5, torch.arange(7), (4, 7, 2), 3, **kw)
