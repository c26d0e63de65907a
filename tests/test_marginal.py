import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from fd import central_gradient
from models import MODELS, make_gaussian
from test_model import random_point

from curvi import ModelView
from curvi.marginal import NoLaplaceApproximation, laplace_log_marginal, laplace_mode


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


def test_laplace_mode_judges_convergence_in_posterior_sds_where_a_gradient_tolerance_cannot():
    # on large data the gradient L-BFGS leaves at the optimum, to rounding, is
    # above any absolute tolerance: here none can be met (gtol = 1e-300), and
    # the mode is accepted because the step left is a sliver of a posterior sd
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    exact = laplace_mode(view, torch.tensor([5.0])).theta
    mode = laplace_mode(view, torch.tensor([5.0]), gtol=1e-300)
    assert mode.converged and mode.grad_norm > 1e-300
    torch.testing.assert_close(mode.theta, exact, rtol=1e-7, atol=1e-8)

    # and on an unbounded density, whose curvature has the wrong sign, it is not
    def bowl():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("up", mu**2)
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(mu, 1.0))

    view = ModelView(bowl, unit_plate="groups")
    assert not laplace_mode(view, torch.tensor([0.5]), max_eval=20).converged


def test_no_laplace_approximation_at_a_non_concave_unit():
    """Started exactly at u = 0, where the gradient vanishes but log p is
    convex (a local minimum between two modes), Newton cannot move."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 2):
            u = pyro.sample("u", dist.Normal(mu, 10.0))
            pyro.factor("two_humps", u**2 - u**4)

    view = ModelView(model, unit_plate="groups")
    with pytest.raises(NoLaplaceApproximation, match="2 units is not negative definite"):
        laplace_log_marginal(view, torch.tensor([0.0]), torch.zeros(2, 1))
    assert issubclass(NoLaplaceApproximation, ValueError)


def test_a_users_own_error_in_the_model_surfaces_from_the_marginal():
    """Only a missing Laplace approximation rejects θ (log density −inf): a
    ValueError of the user's own model propagates with its traceback."""

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            if u.requires_grad and mu.item() > 4.0:  # inside the Laplace evaluation
                raise ValueError("a bug in the user's model")
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

    marginal = LaplaceMarginal(model, unit_plate="groups")
    conditioned = pyro.poutine.condition(marginal, data={"mu": torch.tensor(5.0, dtype=torch.float64)})
    with pytest.raises(ValueError, match="a bug in the user's model"):
        pyro.poutine.trace(conditioned).get_trace(OBS)


# ----------------------------------------------------------- LaplaceMarginal
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoDelta, AutoNormal  # noqa: E402
from pyro.infer.mcmc.util import initialize_model  # noqa: E402

from curvi.marginal import LaplaceMarginal  # noqa: E402


def poisson_model(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))  # a constrained global
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Poisson(u.exp()), obs=obs)


OBS = torch.poisson(torch.full((6, 4), 3.0), torch.Generator().manual_seed(0)).double()


def test_pyro_potential_of_the_marginal_is_the_laplace_log_marginal():
    marginal = LaplaceMarginal(poisson_model, unit_plate="groups")
    _, potential_fn, transforms, _ = initialize_model(marginal, (OBS,))
    view = marginal.view
    for theta in (torch.tensor([1.0, -0.5]), torch.tensor([0.7, 0.3])):
        expected, _ = laplace_log_marginal(view, theta, view.init_y)
        params = {"mu": theta[:1].reshape(()), "tau": theta[1:].reshape(())}
        torch.testing.assert_close(-potential_fn(params), expected, rtol=1e-10, atol=1e-9)


def test_map_on_the_marginal_finds_the_laplace_mode():
    """AutoDelta maximises in constrained space (no Jacobian), laplace_mode in
    unconstrained space: they agree when the globals are unconstrained."""
    model, args, plate = make_gaussian()
    marginal = LaplaceMarginal(model, unit_plate=plate)
    guide = AutoDelta(marginal)
    svi = SVI(marginal, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(*args)
    mode = laplace_mode(marginal.view, marginal.view.init_theta)
    found = marginal.view.pack_globals(guide.median(*args))
    torch.testing.assert_close(found, mode.theta, atol=1e-4, rtol=0)


def test_svi_with_an_autoguide_runs_on_the_marginal():
    marginal = LaplaceMarginal(poisson_model, unit_plate="groups")
    svi = SVI(marginal, AutoNormal(marginal), pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(OBS) for _ in range(50)]
    assert all(math.isfinite(v) for v in losses)


def test_sample_locals_draws_the_laplace_conditional():
    marginal = LaplaceMarginal(make_gaussian()[0], unit_plate="groups")
    obs = make_gaussian()[1][0]
    pyro.poutine.trace(marginal).get_trace(obs)  # set up
    draws = marginal.sample_locals(
        {"mu": torch.full((4000,), 0.4)}, obs, generator=torch.Generator().manual_seed(0)
    )
    u = draws["u"].squeeze(-1)  # (4000, 6, 1) -> (4000, 6)
    prec = 1 / 0.49 + obs.shape[1] / 0.25  # exact conditional of u given mu
    mean = (0.4 / 0.49 + obs.sum(1) / 0.25) / prec
    assert ((u.mean(0) - mean).abs() < 4 * prec**-0.5 / 4000**0.5).all()
    assert ((u.var(0) * prec - 1).abs() < 0.1).all()


def test_marginal_rejects_a_subsampled_unit_plate():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 10, subsample_size=3):
            pyro.sample("u", dist.Normal(mu, 1.0))

    with pytest.raises(ValueError, match="cannot be subsampled"):
        LaplaceMarginal(model, unit_plate="groups")()
