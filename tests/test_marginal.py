import math

import pytest
import torch

import pyro
import pyro.distributions as dist

from curvi import ModelView
from curvi.marginal import laplace_log_marginal, laplace_mode
from fd import central_gradient
from models import MODELS, make_gaussian
from test_model import random_point


def gaussian_log_marginal(obs, mu):
    """Exact log p(mu, z) of models.make_gaussian: z_i ~ N(mu 1, 0.7² 11ᵀ + 0.5² I)."""
    n, m = obs.shape
    cov = 0.49 * torch.ones(m, m) + 0.25 * torch.eye(m)
    lik = dist.MultivariateNormal(mu.expand(m), cov).log_prob(obs).sum()
    return dist.Normal(0.0, 2.0).log_prob(mu) + lik


def test_gaussian_laplace_marginal_is_exact():
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    for mu in (-1.0, 0.3, 2.5):
        theta = torch.tensor([mu])
        value, _ = laplace_log_marginal(view, theta, view.init_y)
        torch.testing.assert_close(value, gaussian_log_marginal(args[0], theta[0]), rtol=1e-12, atol=1e-8)


@pytest.mark.parametrize("name", ["logistic_long", "poisson_vector", "lkj", "nested_latent"])
def test_laplace_marginal_gradient_matches_finite_differences(name):
    model, args, plate = MODELS[name]()
    view = ModelView(model, *args, unit_plate=plate)
    theta0, y0 = random_point(view, scale=0.2)

    def value(theta):
        return laplace_log_marginal(view, theta, y0, xtol=1e-12)[0]

    theta = theta0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(value(theta), theta)
    torch.testing.assert_close(grad, central_gradient(value, theta0), rtol=1e-6, atol=1e-7)


def test_laplace_mode_on_the_gaussian_is_the_marginal_posterior_mode():
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    mode = laplace_mode(view, torch.tensor([5.0]))
    assert mode.converged
    obs = args[0]  # mu | z is Gaussian: precision 1/4 + n/(0.49 + 0.25/m), mean ...
    n, m = obs.shape
    per_group = 1 / (0.49 + 0.25 / m)
    expected = per_group * obs.mean(1).sum() / (0.25 + n * per_group)
    torch.testing.assert_close(mode.theta[0], expected, rtol=1e-7, atol=1e-8)


def test_no_laplace_approximation_at_a_non_concave_unit():
    """Started exactly at u = 0, where the gradient vanishes but log p is
    convex (a local minimum between two modes), Newton cannot move."""
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 2):
            u = pyro.sample("u", dist.Normal(mu, 10.0))
            pyro.factor("two_humps", u**2 - u**4)

    view = ModelView(model, unit_plate="groups")
    with pytest.raises(ValueError, match="2 units is not negative definite"):
        laplace_log_marginal(view, torch.tensor([0.0]), torch.zeros(2, 1))
