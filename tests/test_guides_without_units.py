"""Laplace guides on models without a unit plate: every latent is global and
the precision is the dense negative Hessian (issue 13, item 1)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO

import curvi
from curvi.guides import AmortizedLaplaceGuide, LaplaceGuide

GUIDES = [LaplaceGuide, AmortizedLaplaceGuide]


def make_regression(n=30, seed=0):
    """Bayesian linear regression with known noise: the posterior is Gaussian
    and the Laplace guide at its mean is exact."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    tau, sigma = 2.0, 0.7
    obs = X @ torch.tensor([1.0, -0.5, 0.3]) + sigma * torch.randn(n, generator=g)

    def model(X, obs):
        beta = pyro.sample("beta", dist.Normal(0.0, tau).expand([3]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("obs", dist.Normal((X * beta).sum(-1), sigma), obs=obs)

    precision = X.T @ X / sigma**2 + torch.eye(3) / tau**2
    mean = torch.linalg.solve(precision, X.T @ obs / sigma**2)
    evidence = dist.MultivariateNormal(torch.zeros(n), sigma**2 * torch.eye(n) + tau**2 * X @ X.T)
    exact = {"mean": mean, "precision": precision, "log_evidence": evidence.log_prob(obs)}
    return model, (X, obs), exact


@pytest.mark.parametrize("Guide", GUIDES)
def test_dense_guide_is_the_exact_posterior_of_a_conjugate_regression(Guide):
    model, args, exact = make_regression()
    guide = Guide(model)  # no unit plate: starts at the mode, which is the exact mean
    torch.testing.assert_close(guide.median(*args)["beta"], exact["mean"], rtol=1e-8, atol=1e-8)
    post = guide.laplace_posterior(*args)
    torch.testing.assert_close(post.precision.to_dense(), exact["precision"], rtol=1e-10, atol=1e-10)
    sd = torch.linalg.inv(exact["precision"]).diagonal().sqrt()
    q = guide.quantiles([0.1, 0.9], *args)["beta"]
    torch.testing.assert_close(q[1] - exact["mean"], 1.2815515655446004 * sd, rtol=1e-7, atol=1e-9)
    for seed in range(3):  # every draw's ELBO estimate is the log evidence
        pyro.set_rng_seed(seed)
        loss = Trace_ELBO(num_particles=4, vectorize_particles=True).loss(model, guide, *args)
        assert math.isclose(-loss, float(exact["log_evidence"]), rel_tol=0, abs_tol=1e-8)


def make_logistic(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    obs = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.5, -1.0]) + 0.5), generator=g)

    def model(X, obs):
        a = pyro.sample("a", dist.Normal(0.0, 3.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("obs", dist.Bernoulli(logits=a + (X * beta).sum(-1)), obs=obs)

    return model, (X, obs)


def test_dense_guide_is_trained_by_curvi_fit_and_its_gradient_is_exact():
    model, args = make_logistic()
    guide = LaplaceGuide(model, init_to_mode=False)
    guide(*args)
    params = list(guide.parameters())
    with torch.no_grad():
        params[0].add_(0.3)

    def elbo(seed):
        pyro.set_rng_seed(seed)
        return -Trace_ELBO(num_particles=3, vectorize_particles=True).differentiable_loss(model, guide, *args)

    (grad,) = torch.autograd.grad(elbo(5), params)
    fd = torch.zeros_like(grad)
    for i in range(fd.numel()):
        with torch.no_grad():
            params[0][i] += 1e-5
            up = elbo(5)
            params[0][i] -= 2e-5
            down = elbo(5)
            params[0][i] += 1e-5
        fd[i] = (up - down) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)

    pyro.clear_param_store()
    guide = AmortizedLaplaceGuide(model)
    result = curvi.fit(model, guide, *args, progress=False)
    assert result.converged, result.message
    draws = Predictive(model, guide=guide, num_samples=7)(*args)
    assert draws["beta"].shape == (7, 1, 2) and draws["obs"].shape == (7, 40)


def test_an_indefinite_hessian_is_repaired_where_the_plain_laplace_approximation_fails():
    # a Cauchy likelihood with two far-apart observations: the log density's
    # Hessian is indefinite between them, where the guide starts
    obs = torch.tensor([-4.0, 4.0])

    def model(obs):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", 2):
            pyro.sample("obs", dist.Cauchy(loc, 0.5), obs=obs)

    guide = LaplaceGuide(model, init_to_mode=False, init_loc_fn=lambda site: torch.tensor(0.0))
    guide(obs)
    hessian = -guide.laplace_posterior(obs).precision.A  # repaired: the raw curvature is positive here
    assert (hessian < 0).all()
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True).loss(model, guide, obs)
    assert math.isfinite(loss)


def test_a_plate_of_many_latents_without_unit_plate_gets_a_hint():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 300):
            pyro.sample("u", dist.Normal(mu, 1.0))

    with pytest.warns(UserWarning, match="pass unit_plate='groups'"):
        LaplaceGuide(model, init_to_mode=False)()
