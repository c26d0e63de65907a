"""Adaptive Gauss–Hermite quadrature over the units (issue 14, item 1):
K = 1 is Laplace, exact on Gaussian models, against brute force, exact
gradients, and the front doors (laplace_log_marginal, laplace_mle,
LaplaceMarginal)."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from models import make_gaussian, make_logistic_long, make_nested_latent, make_poisson_vector
from pyro.infer import Predictive, Trace_ELBO

import curvi
from curvi import AmortizedLaplaceGuide, LaplaceMarginal, ModelView, laplace_mle
from curvi.marginal import laplace_hessian, laplace_log_marginal
from curvi.particles import CollapsedELBO, particle_values
from curvi.quadrature import (
    AUTO_NODES,
    gauss_hermite_rule,
    laplace_bias,
    quadrature_log_marginal,
    unit_disagreement,
)


def test_the_rules_integrate_polynomials_exactly():
    x, w = gauss_hermite_rule(4, 2)
    assert x.shape == (16, 2)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    moments = {(2, 0): 1.0, (4, 0): 3.0, (2, 2): 1.0, (6, 0): 15.0, (1, 3): 0.0}
    for (a, b), expected in moments.items():
        torch.testing.assert_close((w * x[:, 0] ** a * x[:, 1] ** b).sum(), torch.tensor(expected))
    # Smolyak beyond 3 dims: exact to total degree 2K - 1, with far fewer nodes
    x, w = gauss_hermite_rule(3, 5)
    assert x.shape[0] < 3**5 and (w < 0).any()
    for powers, expected in (((2, 0, 0, 0, 0), 1.0), ((4, 0, 0, 0, 0), 3.0), ((2, 2, 0, 0, 0), 1.0)):
        value = (w * torch.stack([x[:, j] ** p for j, p in enumerate(powers)]).prod(0)).sum()
        torch.testing.assert_close(value, torch.tensor(expected))


@pytest.mark.parametrize("make", [make_logistic_long, make_poisson_vector, make_nested_latent])
def test_one_node_is_the_laplace_marginal(make):
    model, args, plate = make()
    view = ModelView(model, *args, unit_plate=plate)
    theta = view.init_theta + 0.1
    laplace, _ = laplace_log_marginal(view, theta, view.init_y)
    one = quadrature_log_marginal(view, theta, view.init_y, num_nodes=1)
    torch.testing.assert_close(one.value, laplace, rtol=0, atol=1e-12)


def test_every_rule_is_exact_on_a_gaussian_model():
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    theta = torch.tensor([0.4])
    values = [quadrature_log_marginal(view, theta, view.init_y, num_nodes=K).value for K in (1, 3, 6)]
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-11)
    torch.testing.assert_close(values[2], values[0], rtol=0, atol=1e-11)


def bernoulli_model(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, 1.5))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)


def trapezoid_log_integrals(log_f, y_hat, sd, half_width, num):
    """Each unit's log ∫ e^f by the trapezoid rule on a tensor grid around its
    mode; ``log_f(y)`` takes points ``(G, n, k)`` and gives ``(G, n)``."""
    n, k = y_hat.shape
    grid = torch.linspace(-half_width, half_width, num)
    points = torch.cartesian_prod(*([grid] * k)).reshape(-1, 1, k)
    values = log_f(y_hat + points * sd.unsqueeze(0))  # (G, n)
    cell = k * math.log(grid[1] - grid[0]) + sd.log().sum(-1)
    return torch.logsumexp(values, 0) + cell


def test_one_latent_per_unit_against_brute_force():
    g = torch.Generator().manual_seed(0)
    obs = torch.bernoulli(torch.full((6, 3), 0.3), generator=g)
    view = ModelView(bernoulli_model, obs, unit_plate="groups")
    mu = 0.3
    found = quadrature_log_marginal(view, torch.tensor([mu]), view.init_y, num_nodes=40)

    def log_f(y):  # the unit's prior and its three observations, written out
        u = y[..., 0]
        return dist.Normal(mu, 1.5).log_prob(u) + dist.Bernoulli(logits=u.unsqueeze(-1)).log_prob(obs).sum(-1)

    sd = found.modes.precision.diagonal(dim1=-2, dim2=-1).rsqrt()
    expected = trapezoid_log_integrals(log_f, found.modes.y, sd, half_width=12.0, num=4001)
    torch.testing.assert_close(found.unit_log_integrals, expected, rtol=0, atol=1e-8)
    laplace = quadrature_log_marginal(view, torch.tensor([mu]), view.init_y, num_nodes=1)
    assert (laplace.unit_log_integrals - expected).abs().max() > 1e-3  # Laplace's error shows here


def test_two_latents_per_unit_against_brute_force_in_long_format():
    model, (x, group, obs), plate = make_logistic_long(num_groups=5)
    view = ModelView(model, x, group, obs, unit_plate=plate)
    theta = view.init_theta
    found = quadrature_log_marginal(view, theta, view.init_y, num_nodes=25)
    beta, sigma = theta[:2], theta[2:].exp()  # the view's order: beta, then log sigma

    def log_f(y):  # (G, 5, 2): each group's prior and its own observations, written out
        prior = dist.Normal(0.0, sigma).log_prob(y).sum(-1)
        eta = beta[0] + y[:, group, 0] + (beta[1] + y[:, group, 1]) * x  # (G, num_obs)
        lik = dist.Bernoulli(logits=eta).log_prob(obs)
        return prior + torch.zeros_like(prior).index_add(1, group, lik)

    sd = found.modes.precision.diagonal(dim1=-2, dim2=-1).rsqrt()
    expected = trapezoid_log_integrals(log_f, found.modes.y, sd, half_width=10.0, num=401)
    torch.testing.assert_close(found.unit_log_integrals, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make, num_nodes", [(make_logistic_long, 5), (make_poisson_vector, 3)], ids=["long_k2", "sparse_k3"]
)
def test_gradient_through_the_modes_and_their_curvature_matches_finite_differences(make, num_nodes):
    model, args, plate = make()
    view = ModelView(model, *args, unit_plate=plate)
    theta = (view.init_theta + 0.2).requires_grad_(True)
    value = quadrature_log_marginal(view, theta, view.init_y, num_nodes=num_nodes).value
    (grad,) = torch.autograd.grad(value, theta)
    fd = torch.zeros_like(grad)
    for i in range(theta.numel()):
        step = torch.zeros_like(theta).index_fill_(0, torch.tensor(i), 1e-5)
        up = quadrature_log_marginal(view, (theta + step).detach(), view.init_y, num_nodes=num_nodes).value
        down = quadrature_log_marginal(view, (theta - step).detach(), view.init_y, num_nodes=num_nodes).value
        fd[i] = (up - down) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)


def test_auto_raises_the_nodes_until_the_value_settles():
    g = torch.Generator().manual_seed(1)
    obs = torch.bernoulli(torch.full((20, 4), 0.2), generator=g)
    view = ModelView(bernoulli_model, obs, unit_plate="groups")
    theta = torch.tensor([0.0])
    found = quadrature_log_marginal(view, theta, view.init_y, num_nodes="auto")
    assert found.num_nodes in AUTO_NODES[1:] and found.error < 0.01
    previous = AUTO_NODES[AUTO_NODES.index(found.num_nodes) - 1]
    before = quadrature_log_marginal(view, theta, view.init_y, num_nodes=previous).value
    assert abs(found.value - before).item() == pytest.approx(found.error)
    precise = quadrature_log_marginal(view, theta, view.init_y, num_nodes=30).value
    assert abs(found.value - precise) < 3 * 0.01  # the change estimates the error


def test_bad_arguments():
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    for bad in (0, 2.5, "many", True):
        with pytest.raises((ValueError, TypeError), match="num_nodes"):
            quadrature_log_marginal(view, view.init_theta, view.init_y, num_nodes=bad)
    with pytest.raises(ValueError, match="quadrature must be"):
        LaplaceMarginal(model, unit_plate=plate, quadrature=0)


def cbpp_model(design, herd, size, incidence):
    beta = pyro.param("beta", torch.zeros(4, dtype=torch.float64))
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64), constraint=dist.constraints.positive)
    with pyro.plate("herds", 15):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
    with pyro.plate("obs", len(herd)):
        pyro.sample("y", dist.Binomial(size, logits=design @ beta + u[herd]), obs=incidence)


# glmer's adaptive Gauss-Hermite fits of cbpp (R 4.x, lme4 from Debian's r-cran-lme4):
#   library(lme4)
#   m <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), family = binomial,
#              data = cbpp, nAGQ = k, control = glmerControl(optimizer = "bobyqa"))
#   sprintf("%.8f", c(logLik(m), fixef(m), sqrt(unlist(VarCorr(m)))))
# For nAGQ > 1 glmer's logLik leaves out the saturated model's log likelihood
# (its deviance residuals' constant), which the test adds back from the data.
GLMER_AGQ = {
    5: (-50.00568392, [-1.39919400, -0.99143825, -1.12785341, -1.57950907], 0.64736486),
    25: (-50.00501527, [-1.39923040, -0.99140364, -1.12781945, -1.57947072], 0.64751847),
}


def saturated_log_likelihood(size, incidence):
    p = incidence / size
    log_p = torch.where(p > 0, incidence * p.log(), 0.0) + torch.where(
        p < 1, (size - incidence) * (1 - p).log(), 0.0
    )
    log_choose = torch.lgamma(size + 1) - torch.lgamma(incidence + 1) - torch.lgamma(size - incidence + 1)
    return (log_choose + log_p).sum().item()


@pytest.mark.parametrize("num_nodes", [5, 25])
def test_laplace_mle_with_quadrature_reproduces_glmer_nagq_on_cbpp(num_nodes):
    from curvi.datasets import load_cbpp

    data = load_cbpp(dtype=torch.float64)
    args = (data.design, data.herd, data.size, data.incidence)
    fit = laplace_mle(cbpp_model, *args, unit_plate="herds", quadrature=num_nodes)
    log_lik, beta, sigma = GLMER_AGQ[num_nodes]
    expected = log_lik + saturated_log_likelihood(data.size, data.incidence)
    assert fit.converged and fit.num_nodes == num_nodes
    assert abs(fit.log_likelihood - expected) < 1e-5
    torch.testing.assert_close(fit.params["beta"], torch.tensor(beta), rtol=0, atol=2e-5)
    torch.testing.assert_close(fit.params["sigma"], torch.tensor(sigma), rtol=0, atol=2e-5)
    assert f"{num_nodes} nodes per dimension" in fit.summary()


def test_laplace_mle_chooses_its_nodes_on_cbpp():
    from curvi.datasets import load_cbpp

    data = load_cbpp(dtype=torch.float64)
    args = (data.design, data.herd, data.size, data.incidence)
    laplace = laplace_mle(cbpp_model, *args, unit_plate="herds")
    assert laplace.num_nodes == 1
    pyro.clear_param_store()
    auto = laplace_mle(cbpp_model, *args, unit_plate="herds", quadrature="auto")
    assert auto.num_nodes >= 5 and auto.quadrature_error < 0.01
    limit = GLMER_AGQ[25][0] + saturated_log_likelihood(data.size, data.incidence)
    assert abs(auto.log_likelihood - limit) < 0.01 < abs(laplace.log_likelihood - limit)


def test_laplace_marginal_with_quadrature_adds_the_quadrature_log_likelihood():
    g = torch.Generator().manual_seed(2)
    obs = torch.bernoulli(torch.full((10, 4), 0.3), generator=g)
    marginal = LaplaceMarginal(bernoulli_model, unit_plate="groups", quadrature="auto")
    trace = pyro.poutine.trace(pyro.poutine.condition(marginal, {"mu": torch.tensor(0.2)})).get_trace(obs)
    assert marginal.num_nodes >= 3 and marginal.quadrature_error < 0.01
    view = marginal.view
    theta = torch.tensor([0.2])
    expected = quadrature_log_marginal(view, theta, view.init_y, num_nodes=marginal.num_nodes).value
    prior = dist.Normal(0.0, 2.0).log_prob(theta).sum()
    torch.testing.assert_close(trace.nodes["laplace_log_likelihood"]["fn"].log_factor, expected - prior)


def binary_model(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, sigma))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)


def binary_data(num_groups=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = -0.5 + 1.5 * torch.randn(num_groups, 1, generator=g)
    return torch.bernoulli(torch.sigmoid(u).expand(num_groups, 4), generator=g)


def test_the_collapsed_elbo_is_the_quadrature_marginal_minus_log_q():
    obs = binary_data()
    guide = AmortizedLaplaceGuide(binary_model, unit_plate="groups", quadrature=5)
    assert guide.default_loss(obs).__class__.__name__ == "CollapsedELBO" and guide.collapsed_nodes == 5
    pyro.set_rng_seed(0)
    values, trace = particle_values(
        Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=3),
        binary_model,
        guide,
        (obs,),
        {},
    )
    (site,) = [s for s in trace.nodes.values() if s["type"] == "sample" and "laplace_gaussian" in s["infer"]]
    thetas = site["value"].reshape(3, 2)
    view = guide.view
    for theta, value in zip(thetas, values):
        marginal = quadrature_log_marginal(view, theta.detach(), view.init_y, num_nodes=5).value
        log_q = site["infer"]["laplace_gaussian"].marginal_global().log_prob(theta)
        torch.testing.assert_close(value, marginal - log_q)


def test_the_collapsed_elbo_gradient_matches_finite_differences():
    obs = binary_data()
    guide = AmortizedLaplaceGuide(binary_model, unit_plate="groups", quadrature=3)
    guide(obs)
    (param,) = list(guide.parameters())
    with torch.no_grad():
        param.add_(torch.tensor([0.2, -0.1]))

    def loss():
        pyro.set_rng_seed(7)
        return CollapsedELBO(num_particles=2).differentiable_loss(binary_model, guide, obs)

    (grad,) = torch.autograd.grad(loss(), [param])
    fd = torch.zeros_like(grad)
    for i in range(2):
        with torch.no_grad():
            param[i] += 1e-5
            up = loss()
            param[i] -= 2e-5
            down = loss()
            param[i] += 1e-5
        fd[i] = (up - down) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)


def test_curvi_fit_trains_the_amortized_guide_on_the_collapsed_elbo():
    obs = binary_data(num_groups=60)
    guide = AmortizedLaplaceGuide(binary_model, unit_plate="groups", quadrature="auto")
    result = curvi.fit(binary_model, guide, obs, progress=False)
    assert result.converged, result.message
    assert guide.collapsed_nodes >= 3
    draws = Predictive(binary_model, guide=guide, num_samples=4)(obs)
    assert draws["u"].shape == (4, 60, 1)
    with pytest.raises(ValueError, match="subsamples"):

        def subsampled(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            with pyro.plate("groups", obs.shape[0], subsample_size=10, dim=-2) as idx:
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Bernoulli(logits=u), obs=obs[idx])

        pyro.clear_param_store()
        AmortizedLaplaceGuide(subsampled, unit_plate="groups", quadrature=3)(obs)


def test_marginal_global_precision_with_quadrature_is_the_quadrature_marginals_curvature():
    obs = binary_data()
    guide = AmortizedLaplaceGuide(
        binary_model, unit_plate="groups", quadrature=5, global_precision="marginal"
    )
    guide(obs)
    theta = guide.loc_global.detach()
    expected = -laplace_hessian(guide.view, theta, guide.mode_cache, quadrature=5)
    post = guide.laplace_posterior(obs)
    torch.testing.assert_close(post.precision.schur, expected, rtol=1e-6, atol=1e-8)
    laplace = -laplace_hessian(guide.view, theta, guide.mode_cache)
    assert not torch.allclose(laplace, expected, rtol=1e-3)


def test_the_default_fit_says_when_laplace_is_biased():
    """Binary data in small groups: the default fit warns, with the estimated
    shift; a Gaussian model passes silently; the check can be turned off."""
    obs = binary_data(num_groups=200)
    guide = AmortizedLaplaceGuide(binary_model, unit_plate="groups")
    with pytest.warns(UserWarning, match="posterior sds .* quadrature=5"):
        result = curvi.fit(binary_model, guide, obs, progress=False)
    assert "may be biased" in result.message
    theta = guide.loc_global.detach()
    precision = guide.laplace_posterior(obs).precision.schur
    bias = laplace_bias(guide.view, theta, guide.mode_cache, precision)
    assert bias.max_shift > 0.1 and bias.log_marginal_change != 0
    # a Gaussian model: Laplace is exact, no shift and no warning
    pyro.clear_param_store()
    model, args, plate = make_gaussian()
    gaussian = AmortizedLaplaceGuide(model, unit_plate=plate)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = curvi.fit(model, gaussian, *args, progress=False)
    assert "biased" not in result.message
    pyro.clear_param_store()
    quiet = AmortizedLaplaceGuide(binary_model, unit_plate="groups")
    quiet.bias_tolerance = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        curvi.fit(binary_model, quiet, obs, progress=False)


def test_resampled_unit_draws_correct_laplaces_skew():
    """200 identical groups with observations (1, 1, 0): the conditional of u
    is skewed, and Laplace's draws are centred at its mode; resampled draws
    have the exact conditional mean (1-D trapezoid)."""
    obs = torch.tensor([[1.0, 1.0, 0.0]]).expand(200, 3)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 2.0))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

    grid = torch.linspace(-15.0, 20.0, 20001)
    log_f = dist.Normal(0.0, 2.0).log_prob(grid) + dist.Bernoulli(logits=grid.unsqueeze(-1)).log_prob(
        obs[0]
    ).sum(-1)
    weights = torch.softmax(log_f, 0)
    exact_mean = (weights * grid).sum()
    exact_sd = (weights * (grid - exact_mean) ** 2).sum().sqrt()
    marginal = LaplaceMarginal(model, unit_plate="groups")
    theta = {"mu": torch.zeros(40)}
    g = torch.Generator().manual_seed(0)
    laplace = marginal.sample_locals(theta, obs, generator=g)["u"].reshape(-1)
    resampled = marginal.sample_locals(theta, obs, generator=g, resample=32)["u"].reshape(-1)
    se = exact_sd / math.sqrt(laplace.numel())
    assert abs(laplace.mean() - exact_mean) > 5 * se  # the mode is not the mean here
    assert abs(resampled.mean() - exact_mean) < 4 * se
    assert abs(resampled.std() / exact_sd - 1) < 0.03
    with pytest.raises(ValueError, match="resample"):
        marginal.sample_locals(theta, obs, resample=0)


def test_the_guide_resamples_its_unit_draws_on_request():
    """The guide's own draws (Predictive) with resample_units=M: on 200
    identical groups with a pinned μ they have the skewed conditional's
    exact mean, which the Gaussian draws miss."""
    obs = torch.tensor([[1.0, 1.0, 0.0]]).expand(200, 3)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 1e-4))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 2.0))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

    grid = torch.linspace(-15.0, 20.0, 20001)
    log_f = dist.Normal(0.0, 2.0).log_prob(grid) + dist.Bernoulli(logits=grid.unsqueeze(-1)).log_prob(
        obs[0]
    ).sum(-1)
    weights = torch.softmax(log_f, 0)
    exact_mean = (weights * grid).sum()
    exact_sd = (weights * (grid - exact_mean) ** 2).sum().sqrt()
    pyro.set_rng_seed(0)
    draws = {}
    for resample in (None, 32):
        pyro.clear_param_store()
        guide = AmortizedLaplaceGuide(model, unit_plate="groups", quadrature=5, resample_units=resample)
        draws[resample] = Predictive(model, guide=guide, num_samples=40)(obs)["u"].reshape(-1)
    se = exact_sd / math.sqrt(draws[None].numel())
    assert abs(draws[None].mean() - exact_mean) > 5 * se
    assert abs(draws[32].mean() - exact_mean) < 4 * se
    assert abs(draws[32].std() / exact_sd - 1) < 0.05  # SIR with M proposals narrows by O(1/M)
    with pytest.raises(ValueError, match="resample_units needs quadrature"):
        AmortizedLaplaceGuide(model, unit_plate="groups", resample_units=8)
    with pytest.raises(ValueError, match="resample_units"):
        AmortizedLaplaceGuide(model, unit_plate="groups", quadrature=3, resample_units=0)


def test_a_check_that_cannot_be_made_is_said_and_the_fit_kept(monkeypatch):
    from curvi.modes import NoLaplaceApproximation

    def no_marginal(*args, **kwargs):
        raise NoLaplaceApproximation("the Hessian of 1 units is not negative definite")

    monkeypatch.setattr(curvi.guides, "laplace_bias", no_marginal)
    obs = binary_data()
    guide = AmortizedLaplaceGuide(binary_model, unit_plate="groups")
    with pytest.warns(UserWarning, match="could not be checked"):
        result = curvi.fit(binary_model, guide, obs, progress=False)
    assert result.converged and "could not be checked" in result.message


def test_a_fresh_guide_is_trained_on_the_collapsed_elbo_from_the_first_step():
    """LaplaceNewton's particle values and CollapsedELBO set a fresh guide up
    before asking whether it is collapsed (the first step was the joint ELBO)."""
    obs = binary_data()
    fresh = AmortizedLaplaceGuide(binary_model, unit_plate="groups", quadrature=3)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=3)
    values, trace = particle_values(elbo, binary_model, fresh, (obs,), {})
    (site,) = [s for s in trace.nodes.values() if s["type"] == "sample" and "laplace_gaussian" in s["infer"]]
    q = site["infer"]["laplace_gaussian"]
    for theta, value in zip(site["value"].reshape(2, 2), values):
        marginal = quadrature_log_marginal(fresh.view, theta.detach(), fresh.view.init_y, num_nodes=3).value
        torch.testing.assert_close(value, marginal - q.marginal_global().log_prob(theta))
    pyro.clear_param_store()
    loss = CollapsedELBO(num_particles=2).loss(
        binary_model, AmortizedLaplaceGuide(binary_model, unit_plate="groups", quadrature=3), obs
    )
    assert math.isfinite(loss)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="quadrature="):
        CollapsedELBO().loss(binary_model, AmortizedLaplaceGuide(binary_model, unit_plate="groups"), obs)


def test_bad_arguments_of_the_unit_checks():
    obs = binary_data()
    view = ModelView(binary_model, obs, unit_plate="groups")
    with pytest.raises(ValueError, match="tol must be positive"):
        unit_disagreement(view, view.init_theta, view.init_y, 3, tol=0.0)
    with pytest.raises(ValueError, match=r"precision must be the \(2, 2\)"):
        laplace_bias(view, view.init_theta, view.init_y, torch.eye(3))
    with pytest.raises(ValueError, match="num_nodes"):
        laplace_bias(view, view.init_theta, view.init_y, torch.eye(2), num_nodes=0)
