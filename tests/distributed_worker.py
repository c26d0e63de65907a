"""One process of tests/test_distributed.py: a logistic GLMM with a random
intercept and slope per unit, fitted by curvi with the units taken from
``curvi.local_units``; results saved with ``torch.save``.

Run alone it is one process; with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set
(as torchrun sets them) it is one of several. ``python distributed_worker.py
TASK OUT`` with TASK one of ``agree`` (ELBO, gradient, Newton step, a short
checkpointed fit and the MLE), ``raise`` (rank 1's model raises during the
fit) and ``kill`` (rank 1 is killed during the fit).
"""

from __future__ import annotations

import os
import signal
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.infer.autoguide.initialization import init_to_value
from torch.distributions import constraints

import curvi
from curvi import distributed

NUM_UNITS, PER_UNIT = 37, 6
#: where the ELBO, its gradient and the Newton step are compared (unconstrained mu, log sigma)
THETA = torch.tensor([-0.3, 0.05, -0.2, -0.3], dtype=torch.float64)
#: where the fits start
START = init_to_value(values={"mu": THETA[:2], "sigma": THETA[2:].exp()})


def data():
    """Every unit's data (the same in every process), then this process's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_UNITS, PER_UNIT, generator=g, dtype=torch.float64)
    u = 0.8 * torch.randn(NUM_UNITS, 2, generator=g, dtype=torch.float64)
    logits = -0.3 + u[:, :1] + (0.5 + u[:, 1:]) * x
    y = torch.bernoulli(torch.sigmoid(logits), generator=g)
    units = curvi.local_units(NUM_UNITS)
    return x[units], y[units]


def model(x, y, fail_at=None):
    """Bayesian: priors on the globals; unit i has intercept and slope."""
    one = torch.ones((), dtype=torch.float64)
    mu = pyro.sample("mu", dist.Normal(0 * one, 2 * one).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(one).expand([2]).to_event(1))
    if fail_at is not None and distributed.rank() == 1:
        fail_at["calls"] += 1
        if fail_at["calls"] == fail_at["at"]:
            if fail_at["how"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("rank 1's model fails on purpose")
    with pyro.plate("units", x.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, sigma).to_event(1))
        with pyro.plate("obs", x.shape[1], dim=-1):
            logits = u[..., 0] + u[..., 1] * x
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def mixture(x, y):
    """A discrete site per unit, summed out by enumeration."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 2.0).to_event(1))
    with pyro.plate("units", x.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, 1.0).to_event(1))
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=u[..., 0] + c + u[..., 1] * x), obs=y)


def ml_model(x, y):
    """Maximum likelihood: the globals are pyro.params."""
    mu = pyro.param("mu", torch.zeros(2, dtype=torch.float64))
    sigma = pyro.param("sigma", torch.ones(2, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("units", x.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, sigma).to_event(1))
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=u[..., 0] + u[..., 1] * x), obs=y)


def _fit_guide():
    """The fits' guide: from START, with the units' modes solved to 1e-13 so
    that runs agree to rounding rather than to the default tolerance's
    stopping points."""
    return curvi.AmortizedLaplaceGuide(
        model, unit_plate="units", init_loc_fn=START, init_to_mode=False, xtol=1e-13
    )


def agree(out_dir):
    """Everything the test compares with one process."""
    x, y = data()
    results = {}
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = curvi.AmortizedLaplaceGuide(model, unit_plate="units")
    results["theta_initial"] = guide(x, y) and guide.loc_global.detach().clone()  # the mode of the marginal
    # the comparisons below start from one point in every run
    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(THETA)
    optim = curvi.LaplaceNewton()
    optim.loss.loss_and_grads(model, guide, x, y)
    first = optim.loss.last
    results["elbo"], results["grad"], results["precision"] = first.value, first.grad, first.precision
    for p in pyro.get_param_store().values():
        p.grad = None
    svi = SVI(model, guide, optim, optim.loss)
    svi.step(x, y)  # the first Newton step
    results["theta_after_step"] = guide.loc_global.detach().clone()

    # the collapsed ELBO of quadrature (the units' log marginals by 5 nodes per
    # dimension) and q(θ) from the marginal's curvature: one evaluation each
    for name, options in {
        "quadrature": {"quadrature": 5},
        "marginal": {"global_precision": "marginal"},
    }.items():
        pyro.clear_param_store()
        guide = curvi.AmortizedLaplaceGuide(model, unit_plate="units", init_loc_fn=START, **options)
        optim = curvi.LaplaceNewton()
        guide(x, y)  # set up, then move to the common point
        with torch.no_grad():
            guide.loc_global_unconstrained.copy_(THETA)
        optim.loss.loss_and_grads(model, guide, x, y)
        last = optim.loss.last
        results[f"{name}_elbo"], results[f"{name}_grad"] = last.value, last.grad
        results[f"{name}_precision"] = last.precision

    pyro.clear_param_store()
    guide = _fit_guide()
    path = os.path.join(out_dir, "fit.pt")
    fit = curvi.fit(
        model, guide, x, y, steps=8, checkpoint=path, checkpoint_every=4, resume=False, progress=False
    )
    results["fit_elbo"] = fit.elbo
    results["fit_theta"] = guide.loc_global.detach().clone()
    results["checkpoint"] = torch.load(path, weights_only=False)
    # resumed from the checkpoint: the same continuation as without the stop
    pyro.clear_param_store()
    guide = _fit_guide()
    resumed = curvi.fit(model, guide, x, y, steps=12, checkpoint=path, progress=False)
    results["resumed_elbo"] = resumed.elbo
    results["resumed_theta"] = guide.loc_global.detach().clone()

    pyro.clear_param_store()
    mle = curvi.laplace_mle(ml_model, x, y, unit_plate="units")
    results["mle"] = {name: v.detach().clone() for name, v in mle.params.items()}
    results["mle_se"] = {name: v.detach().clone() for name, v in mle.std_errors.items()}
    results["mle_loglik"] = mle.log_likelihood
    results["mle_nobs"] = mle.num_observations
    results["mle_modes"] = mle.modes["u"]
    results["mle_summary"] = mle.summary()
    return results


def unsharded():
    """Every process holds every unit (local_units never called): refused."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_UNITS, PER_UNIT, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.full_like(x, 0.5), generator=g)
    torch.distributed.init_process_group("gloo")
    curvi.AmortizedLaplaceGuide(model, unit_plate="units")(x, y)


def refusals(out):
    """What does not sum over processes is refused by name; the messages saved."""
    x, y = data()
    messages = {}
    attempts = {
        "pyro_svi": lambda guide: SVI(
            model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO()
        ).step(x, y),
        "fit_adam": lambda guide: curvi.fit(model, guide, x, y, optim=pyro.optim.Adam({"lr": 0.01}), steps=2),
        "laplace_guide": lambda guide: curvi.fit(
            model, curvi.LaplaceGuide(model, unit_plate="units"), x, y, steps=2, progress=False
        ),
        "marginal_nuts": lambda guide: curvi.LaplaceMarginal(model, unit_plate="units")(x, y),
        "collapsed_svi": lambda guide: SVI(
            model,
            curvi.AmortizedLaplaceGuide(model, unit_plate="units", quadrature=3),
            pyro.optim.Adam({"lr": 0.01}),
            curvi.CollapsedELBO(num_particles=2),
        ).step(x, y),
        "enumerated": lambda guide: curvi.AmortizedLaplaceGuide(
            pyro.poutine.block(mixture, hide=["c"]), unit_plate="units"
        )(x, y),
    }
    for name, attempt in attempts.items():
        pyro.clear_param_store()
        try:
            attempt(curvi.AmortizedLaplaceGuide(model, unit_plate="units"))
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def fail(how):
    x, y = data()
    pyro.clear_param_store()
    guide = curvi.AmortizedLaplaceGuide(model, unit_plate="units")
    guide(x, y)  # set up before the failure is armed
    fail_at = {"calls": 0, "at": 6, "how": how}
    curvi.fit(model, guide, x, y, steps=20, progress=False, fail_at=fail_at)


def main():
    task, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if task == "agree":
        results = agree(os.path.dirname(out))
        results["world_size"] = distributed.world_size()
        torch.save(results, out)
    elif task == "refusals":
        torch.save(refusals(out), out)
    elif task == "unsharded":
        unsharded()
    else:
        fail(task)


if __name__ == "__main__":
    main()
