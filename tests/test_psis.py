"""Pareto-smoothed importance sampling of guides (issue 14, item 3): the
sign of ArviZ's PSIS checked on eight schools' known posterior, a good and
a failing case, collapsed and joint draws, per-unit flags."""

import math

import eight_schools as es
import pyro
import pyro.distributions as dist
import pytest
import torch
from models import make_poisson_vector
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from curvi import AmortizedLaplaceGuide
from curvi.psis import psis


def integrated_model(y, sigma):
    """Eight schools with the school effects integrated out exactly."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    var = sigma**2 + tau.unsqueeze(-1) ** 2
    pyro.factor("y", dist.Normal(mu.unsqueeze(-1), var.sqrt()).log_prob(y).sum(-1))


def best_gaussian_guide(y, sigma):
    """The best Gaussian q(μ, log τ) of tests/eight_schools.py."""
    mean = torch.tensor(es.BEST_GAUSSIAN_MEAN)
    z = pyro.sample(
        "z", dist.MultivariateNormal(mean, torch.tensor(es.BEST_GAUSSIAN_COV)), infer={"is_auxiliary": True}
    )
    pyro.sample("mu", dist.Delta(z[..., 0]))
    pyro.sample("tau", dist.Delta(z[..., 1].exp(), log_density=-z[..., 1]))


def exact_posterior_moments():
    """Posterior mean and sd of μ and τ by the trapezoid rule over (μ, log τ)."""
    y, sigma = torch.tensor(es.Y), torch.tensor(es.SIGMA)
    mu = torch.linspace(-40.0, 50.0, 901)
    u = torch.linspace(-12.0, 8.0, 801)
    log_f = es._log_joint_integrated(mu[:, None], u[None, :], y, sigma)
    w = torch.softmax(log_f.reshape(-1), 0).reshape(log_f.shape)
    tau = u.exp()[None, :]
    moments = {}
    for name, x in (("mu", mu[:, None]), ("tau", tau)):
        mean = (w * x).sum()
        moments[name] = (mean, ((w * (x - mean) ** 2).sum()).sqrt())
    return moments


def test_the_weights_have_the_right_sign_on_eight_schools():
    """Reweighting the best Gaussian q(μ, log τ) moves its moments to the
    known posterior's, and the raw weights estimate the known evidence."""
    y, sigma = torch.tensor(es.Y), torch.tensor(es.SIGMA)
    pyro.set_rng_seed(0)
    result = psis(integrated_model, best_gaussian_guide, y, sigma, num_samples=20000, chunk_size=5000)
    exact = exact_posterior_moments()
    assert abs(result.log_evidence - es.LOG_EVIDENCE) < 0.02
    for name in ("mu", "tau"):
        mean, sd = exact[name]
        assert abs(result.mean[name] - mean) < 0.05 * sd
    # unweighted, q's mean of tau is off by much more: the reweighting did the work
    assert abs(result.draws["tau"].mean() - exact["tau"][0]) > 3 * abs(result.mean["tau"] - exact["tau"][0])
    q10, q90 = result.quantiles([0.1, 0.9])["mu"]
    assert q10 < exact["mu"][0] < q90


def test_the_amortized_guide_at_its_elbo_optimum_on_eight_schools_is_flagged():
    """On eight schools' funnel the amortized guide's ELBO optimum (τ̂ = 27)
    has a narrow q(log τ) that leaves out the posterior's small τ: k̂ says
    so (collapsed over the schools by quadrature). At its start, the Laplace
    mode, q(τ) is wide (10 % to 90 %: 0.27 to 49) and the weights are fine."""
    model, args, plate = es.make_eight_schools()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    pyro.set_rng_seed(1)
    start = psis(model, guide, *args, num_samples=400)
    assert start.collapsed and start.num_nodes >= 3 and start.k_hat < 0.5
    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(torch.tensor(es.AMORTIZED_GUIDE_BEST_THETA))
    pyro.set_rng_seed(1)
    optimum = psis(model, guide, *args, num_samples=400)
    assert optimum.k_hat > 0.7 and "unreliable" in repr(optimum)
    assert set(optimum.draws) == {"mu", "tau"}


def poisson_model(counts):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", counts.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", counts.shape[1], dim=-1):
            pyro.sample("c", dist.Poisson(u.exp()), obs=counts)


def test_a_well_identified_model_passes():
    g = torch.Generator().manual_seed(5)
    rates = (1.0 + 0.5 * torch.randn(60, 1, generator=g)).exp()
    args = (torch.poisson(rates.expand(60, 10), generator=g),)
    model, plate = poisson_model, "groups"
    # q(θ) with the Laplace marginal's curvature: close to the posterior of (mu, log tau)
    guide = AmortizedLaplaceGuide(model, unit_plate=plate, global_precision="marginal")
    pyro.set_rng_seed(0)
    result = psis(model, guide, *args, num_samples=1000, quadrature=3)
    assert result.k_hat < 0.5 and "good" in repr(result)
    assert result.ess > 900
    assert result.flagged_units.numel() == 0
    # the reweighted means stay within the guide's own sds
    quantiles = guide.quantiles([0.5], *args)
    assert abs(result.mean["mu"] - quantiles["mu"][0]) < 0.5 * result.sd["mu"]


def test_any_pyro_guide_gets_joint_weights():
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(30, generator=g) + 1.0

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(obs)):
            pyro.sample("z", dist.Normal(mu, sigma), obs=obs)

    guide = AutoNormal(model)
    svi = SVI(
        model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(num_particles=4, vectorize_particles=True)
    )
    for _ in range(400):
        svi.step(obs)
    pyro.set_rng_seed(4)
    result = psis(model, guide, obs, num_samples=1000, chunk_size=300)
    assert not result.collapsed and result.flagged_units is None
    assert result.draws["mu"].shape == (1000,) and result.draws["sigma"].shape == (1000,)
    assert result.k_hat < 0.7
    # the reweighted mean of mu is the posterior's (nearly the sample mean)
    assert abs(result.mean["mu"] - obs.mean()) < 0.1
    assert math.isfinite(result.log_evidence)


def test_bad_arguments():
    model, args, plate = make_poisson_vector()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    with pytest.raises(ValueError, match="num_samples"):
        psis(model, guide, *args, num_samples=1)


def test_nan_weights_are_an_error_not_a_zero_weight():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("broken", torch.where(mu > 0.0, torch.tensor(math.nan), torch.tensor(0.0)))

    guide = AutoNormal(model)
    guide()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="NaN or infinite"):
        psis(model, guide, num_samples=200)  # without Pyro's validation, NaN reaches the weights
