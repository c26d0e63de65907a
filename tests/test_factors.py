"""Several grouping factors (issue 15): the view, the sparse Hessian read
off the model, the joint Laplace marginal and laplace_mle, against dense
references (float64) and glmmTMB on lme4's Penicillin (crossed), Pastes
(nested) and grouseticks (three nested factors, Poisson)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from curvi import laplace_mle
from curvi.datasets import (
    GROUSETICKS_GLMMTMB,
    PASTES_GLMMTMB,
    PENICILLIN_GLMMTMB,
    load_grouseticks,
    load_pastes,
    load_penicillin,
)
from curvi.factors import FactorView
from curvi.marginal import laplace_log_marginal
from curvi.sparse_hessian import hessian_pattern, sparse_hessian
from curvi.sparse_laplace import solve_joint_modes


def crossed_model(subject, item, obs):
    """(1 + x | subject) + (1 | item), Poisson, with globals."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("subjects", int(subject.max()) + 1):
        a = pyro.sample("a", dist.Normal(torch.zeros(2), tau[..., None]).to_event(1))
    with pyro.plate("items", int(item.max()) + 1):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
    x = torch.linspace(-1, 1, len(obs))
    with pyro.plate("obs", len(obs)):
        rate = (mu + a[..., subject, 0] + a[..., subject, 1] * x + b[..., item]).exp()
        pyro.sample("z", dist.Poisson(rate), obs=obs)


def crossed_data(num_subjects=7, num_items=5, num_obs=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    subject = torch.cat(
        [torch.arange(num_subjects), torch.randint(0, num_subjects, (num_obs - num_subjects,), generator=g)]
    )
    item = torch.cat(
        [torch.arange(num_items), torch.randint(0, num_items, (num_obs - num_items,), generator=g)]
    )
    obs = torch.poisson(torch.full((num_obs,), 2.0, dtype=torch.float64), generator=g)
    return subject, item, obs


def nested_model(school, obs):
    """(1 | school / class): classes in a plate of their own, indexed by their school."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("schools", int(school.max()) + 1):
        s = pyro.sample("s", dist.Normal(0.0, 1.0))
    with pyro.plate("classes", len(school)):
        c = pyro.sample("c", dist.Normal(s[school], 0.5))
    with pyro.plate("obs", obs.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=mu + c[torch.arange(obs.shape[0]) % len(school)]), obs=obs)


def nested_data(num_schools, classes_per_school=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    school = torch.arange(num_schools).repeat_interleave(classes_per_school)
    obs = torch.bernoulli(torch.full((4 * len(school),), 0.4, dtype=torch.float64), generator=g)
    return school, obs


def dense_hessian(view, theta, x):
    return torch.autograd.functional.hessian(lambda v: view.log_joint(theta, v), x)


@pytest.mark.parametrize(
    "model, data, plates",
    [
        (crossed_model, crossed_data(), ("subjects", "items")),
        (nested_model, nested_data(4), ("schools", "classes")),
        (nested_model, nested_data(4), ("classes", "schools")),
    ],
)
def test_the_sparse_hessian_equals_the_dense_one(model, data, plates):
    view = FactorView(model, *data, unit_plate=plates)
    g = torch.Generator().manual_seed(1)
    theta = view.init_theta + 0.1
    x = view.init_y + 0.3 * torch.randn(view.latent_dim, generator=g, dtype=torch.float64)
    pattern = hessian_pattern(view, theta, x)
    log_prob, grad, values = sparse_hessian(view, theta, x, pattern)
    torch.testing.assert_close(
        pattern.lower.to_dense(values), dense_hessian(view, theta, x), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(log_prob, view.log_joint(theta, x), rtol=0, atol=1e-12)
    assert pattern.nested == (model is nested_model)


def test_three_factors_crossed_and_nested_at_once():
    """subjects × items crossed, classes nested in subjects: a mixed design."""

    def model(subject, item, obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("subjects", 6):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("sessions", 12):
            s = pyro.sample("s", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("items", 4):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
        session = torch.arange(len(obs)) % 12
        with pyro.plate("obs", len(obs)):
            eta = mu + a[session // 2] + s[session, 0] + 0.5 * s[session, 1] + b[item]
            pyro.sample("z", dist.Poisson(eta.exp()), obs=obs)

    g = torch.Generator().manual_seed(0)
    item = torch.randint(0, 4, (48,), generator=g)
    obs = torch.poisson(torch.full((48,), 1.5, dtype=torch.float64), generator=g)
    view = FactorView(model, None, item, obs, unit_plate=("subjects", "sessions", "items"))
    assert view.factor_sizes == (6, 12, 4) and view.factor_dims == (1, 2, 1)
    theta, x = view.init_theta, view.init_y + 0.1
    pattern = hessian_pattern(view, theta, x)
    _, _, values = sparse_hessian(view, theta, x, pattern)
    torch.testing.assert_close(
        pattern.lower.to_dense(values), dense_hessian(view, theta, x), rtol=0, atol=1e-10
    )


def test_the_number_of_products_does_not_grow_with_the_units():
    counts = []
    for num_schools in (5, 50, 500):
        view = FactorView(nested_model, *nested_data(num_schools), unit_plate=("schools", "classes"))
        pattern = hessian_pattern(view, view.init_theta, view.init_y)
        counts.append(pattern.num_products)
        assert pattern.nested
        factor = pattern.lower.factor(-sparse_hessian(view, view.init_theta, view.init_y, pattern)[2])
        assert factor.nnz == pattern.lower.nnz  # a tree: eliminated leaves first, no fill
    assert counts[0] == counts[1] == counts[2] <= 4


def test_gaussian_crossed_marginal_is_exact():
    data = load_penicillin(dtype=torch.float64)

    def model(plate, sample, y):
        mu = pyro.sample("mu", dist.Normal(20.0, 10.0))
        with pyro.plate("plates", 24):
            a = pyro.sample("a", dist.Normal(0.0, 0.8))
        with pyro.plate("samples", 6):
            b = pyro.sample("b", dist.Normal(0.0, 1.8))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(mu + a[plate] + b[sample], 0.55), obs=y)

    view = FactorView(model, data.plate, data.sample, data.diameter, unit_plate=("plates", "samples"))
    mu = torch.tensor([22.5], dtype=torch.float64, requires_grad=True)
    value, modes = laplace_log_marginal(view, mu, view.init_y)
    Zp = torch.nn.functional.one_hot(data.plate).double()
    Zs = torch.nn.functional.one_hot(data.sample).double()
    cov = 0.8**2 * Zp @ Zp.T + 1.8**2 * Zs @ Zs.T + 0.55**2 * torch.eye(144, dtype=torch.float64)
    exact = dist.MultivariateNormal(mu * torch.ones(144, dtype=torch.float64), cov).log_prob(data.diameter)
    exact = exact + dist.Normal(20.0, 10.0).log_prob(mu).sum()
    torch.testing.assert_close(value, exact, rtol=0, atol=1e-9)
    (grad,) = torch.autograd.grad(value, mu)
    (expected,) = torch.autograd.grad(exact, mu)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-8)


def mixed_model(item, obs):
    """subjects × items crossed, two-coordinate sessions nested in subjects."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("subjects", 6):
        a = pyro.sample("a", dist.Normal(0.0, tau))
    with pyro.plate("sessions", 12):
        s = pyro.sample("s", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("items", 4):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
    session = torch.arange(len(obs)) % 12
    with pyro.plate("obs", len(obs)):
        eta = mu + a[session // 2] + s[session, 0] + 0.5 * s[session, 1] + b[item]
        pyro.sample("z", dist.Poisson(eta.exp()), obs=obs)


def mixed_data():
    g = torch.Generator().manual_seed(0)
    item = torch.randint(0, 4, (48,), generator=g)
    return item, torch.poisson(torch.full((48,), 1.5, dtype=torch.float64), generator=g)


def poisson_nested_model(school, obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("schools", int(school.max()) + 1):
        s = pyro.sample("s", dist.Normal(0.0, tau))
    with pyro.plate("classes", len(school)):
        c = pyro.sample("c", dist.Normal(s[school], 0.5))
    with pyro.plate("obs", obs.shape[0]):
        pyro.sample("z", dist.Poisson((mu + c[torch.arange(obs.shape[0]) % len(school)]).exp()), obs=obs)


@pytest.mark.parametrize(
    "model, data, plates",
    [
        (crossed_model, crossed_data(), ("subjects", "items")),
        (poisson_nested_model, (nested_data(4)[0], torch.arange(24.0) % 3), ("schools", "classes")),
        (mixed_model, mixed_data(), ("subjects", "sessions", "items")),
    ],
)
def test_the_marginal_equals_a_dense_laplace_and_its_gradient_finite_differences(model, data, plates):
    view = FactorView(model, *data, unit_plate=plates)
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    value, modes = laplace_log_marginal(view, theta, view.init_y)
    assert bool(modes.converged)
    x = modes.y + modes.step
    H = dense_hessian(view, theta, x)
    g = torch.func.grad(lambda v: view.log_joint(theta, v))(x)
    assert g.abs().max() < 1e-12
    dense = view.log_joint(theta, x) + 0.5 * view.latent_dim * math.log(2 * math.pi) - 0.5 * torch.logdet(-H)
    torch.testing.assert_close(value, dense, rtol=0, atol=1e-10)

    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(laplace_log_marginal(view, t, x)[0], t)
    fd = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = 1e-5
        fd[i] = (
            laplace_log_marginal(view, theta + e, x)[0] - laplace_log_marginal(view, theta - e, x)[0]
        ) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------- against glmmTMB
def penicillin_model(plate, sample, y):
    mu = pyro.param("(Intercept)", torch.tensor(20.0, dtype=torch.float64))
    sd_plate = pyro.param("sd_plate", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    sd_sample = pyro.param(
        "sd_sample", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive
    )
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("plates", 24):
        a = pyro.sample("a", dist.Normal(0.0, sd_plate))
    with pyro.plate("samples", 6):
        b = pyro.sample("b", dist.Normal(0.0, sd_sample))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + a[plate] + b[sample], sigma), obs=y)


def pastes_model(batch, sample, y):
    mu = pyro.param("(Intercept)", torch.tensor(50.0, dtype=torch.float64))
    sd_batch = pyro.param("sd_batch", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    sd_sample = pyro.param(
        "sd_sample", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive
    )
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("batches", 10):
        a = pyro.sample("a", dist.Normal(0.0, sd_batch))
    with pyro.plate("samples", 30):
        c = pyro.sample("c", dist.Normal(0.0, sd_sample))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + a[batch] + c[sample], sigma), obs=y)


def grouseticks_model(design, index, brood, location, ticks):
    beta = pyro.param("beta", torch.zeros(4, dtype=torch.float64))
    sds = {
        name: pyro.param(
            f"sd_{name}", torch.tensor(0.5, dtype=torch.float64), constraint=constraints.positive
        )
        for name in ("brood", "index", "location")
    }
    with pyro.plate("broods", 118):
        b = pyro.sample("b", dist.Normal(0.0, sds["brood"]))
    with pyro.plate("indices", 403):
        i = pyro.sample("i", dist.Normal(0.0, sds["index"]))
    with pyro.plate("locations", 63):
        loc = pyro.sample("loc", dist.Normal(0.0, sds["location"]))
    with pyro.plate("obs", len(ticks)):
        eta = design @ beta + b[brood] + i[index] + loc[location]
        pyro.sample("ticks", dist.Poisson(eta.exp()), obs=ticks)


def test_laplace_mle_reproduces_glmmtmb_on_penicillin_crossed():
    pyro.clear_param_store()
    data = load_penicillin(dtype=torch.float64)
    fit = laplace_mle(
        penicillin_model, data.plate, data.sample, data.diameter, unit_plate=("plates", "samples")
    )
    ref = PENICILLIN_GLMMTMB
    assert fit.converged, fit.message
    assert abs(fit.log_likelihood - ref["log_likelihood"]) < 1e-5
    torch.testing.assert_close(fit.params["(Intercept)"].item(), ref["fixed_effects"][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.params["sd_plate"].item(), ref["sds"]["plate"], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.params["sd_sample"].item(), ref["sds"]["sample"], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.params["sigma"].item(), ref["residual_sd"], rtol=0, atol=1e-4)


def test_laplace_mle_reproduces_glmmtmb_on_pastes_nested():
    pyro.clear_param_store()
    data = load_pastes(dtype=torch.float64)
    fit = laplace_mle(pastes_model, data.batch, data.sample, data.strength, unit_plate=("samples", "batches"))
    ref = PASTES_GLMMTMB
    assert fit.converged, fit.message
    assert abs(fit.log_likelihood - ref["log_likelihood"]) < 1e-5
    torch.testing.assert_close(fit.params["(Intercept)"].item(), ref["fixed_effects"][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.params["sd_batch"].item(), ref["sds"]["batch"], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.params["sd_sample"].item(), ref["sds"]["sample"], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.params["sigma"].item(), ref["residual_sd"], rtol=0, atol=1e-4)


def test_laplace_mle_reproduces_glmmtmb_on_grouseticks_three_nested_factors():
    pyro.clear_param_store()
    data = load_grouseticks(dtype=torch.float64)
    fit = laplace_mle(
        grouseticks_model,
        data.design,
        data.index,
        data.brood,
        data.location,
        data.ticks,
        unit_plate=("indices", "broods", "locations"),
    )
    ref = GROUSETICKS_GLMMTMB
    assert fit.converged, fit.message
    assert abs(fit.log_likelihood - ref["log_likelihood"]) < 1e-5
    torch.testing.assert_close(
        fit.params["beta"], torch.tensor(ref["fixed_effects"], dtype=torch.float64), rtol=0, atol=1e-4
    )
    for name, sd in ref["sds"].items():
        torch.testing.assert_close(fit.params[f"sd_{name}"].item(), sd, rtol=0, atol=1e-4)
    # chicks in broods in locations: nested (the graph has chick–brood–location
    # triangles, chordal), factored without fill, one product per factor
    view = FactorView(
        grouseticks_model,
        data.design,
        data.index,
        data.brood,
        data.location,
        data.ticks,
        unit_plate=("indices", "broods", "locations"),
    )
    pattern = hessian_pattern(view, view.init_theta, view.init_y)
    assert pattern.nested and pattern.num_products == 3
    values = -sparse_hessian(view, view.init_theta, view.init_y, pattern)[2]
    assert pattern.lower.factor(values).nnz == pattern.lower.nnz


# ------------------------------------------------------------ bad input
def test_bad_structures_are_refused_by_name():
    data = crossed_data()
    with pytest.raises(ValueError, match="no plate named 'items2'"):
        FactorView(crossed_model, *data, unit_plate=("subjects", "items2"))
    with pytest.raises(ValueError, match="holds no latent"):
        FactorView(crossed_model, *data, unit_plate=("subjects", "obs"))
    with pytest.raises(ValueError, match="names a plate twice"):
        FactorView(crossed_model, *data, unit_plate=("items", "items"))

    def two_plates(obs):
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 2, dim=-1):
            pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("z", dist.Normal(0.0, 1.0), obs=obs)

    with pytest.raises(ValueError, match="sits in the unit plates"):
        FactorView(two_plates, torch.tensor(0.0), unit_plate=("rows", "cols"))


def test_units_of_one_factor_coupled_by_a_term_are_refused():
    def model(obs):
        with pyro.plate("a_units", 4):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("b_units", 2):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", 4):
            pyro.sample("z", dist.Normal(a + 0.5 * a.roll(1) + b[torch.arange(4) % 2], 1.0), obs=obs)

    view = FactorView(model, torch.zeros(4, dtype=torch.float64), unit_plate=("a_units", "b_units"))
    with pytest.raises(ValueError, match="more than one unit of plate 'a_units'"):
        solve_joint_modes(view, view.init_theta, view.init_y)


def test_laplace_mle_refuses_quadrature_with_several_factors():
    pyro.clear_param_store()
    data = load_penicillin(dtype=torch.float64)
    with pytest.raises(ValueError, match="jointly, by Laplace"):
        laplace_mle(
            penicillin_model,
            data.plate,
            data.sample,
            data.diameter,
            unit_plate=("plates", "samples"),
            quadrature=5,
        )


def test_laplace_marginal_with_several_factors_is_the_exact_gaussian_marginal_and_draws_the_units():
    import pyro.poutine as poutine

    from curvi import LaplaceMarginal

    data = load_penicillin(dtype=torch.float64)

    def model(plate, sample, y):
        mu = pyro.sample("mu", dist.Normal(20.0, 10.0))
        with pyro.plate("plates", 24):
            a = pyro.sample("a", dist.Normal(0.0, 0.8))
        with pyro.plate("samples", 6):
            b = pyro.sample("b", dist.Normal(0.0, 1.8))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(mu + a[plate] + b[sample], 0.55), obs=y)

    args = (data.plate, data.sample, data.diameter)
    marginal = LaplaceMarginal(model, unit_plate=("plates", "samples"))
    Z = torch.cat(
        [torch.nn.functional.one_hot(data.plate), torch.nn.functional.one_hot(data.sample)], -1
    ).double()
    prior_cov = torch.diag(torch.cat([torch.full((24,), 0.64), torch.full((6,), 1.8**2)])).double()
    cov = Z @ prior_cov @ Z.T + 0.55**2 * torch.eye(144, dtype=torch.float64)
    for mu in (21.0, 23.5):
        mu = torch.tensor(mu, dtype=torch.float64)
        trace = poutine.trace(poutine.condition(marginal, {"mu": mu})).get_trace(*args)
        exact = dist.MultivariateNormal(mu * torch.ones(144, dtype=torch.float64), cov).log_prob(
            data.diameter
        )
        torch.testing.assert_close(
            trace.log_prob_sum(), exact + dist.Normal(20.0, 10.0).log_prob(mu), rtol=0, atol=1e-9
        )
    # the units given mu: N(S Zᵀ (y − mu) / σ², S), S = (ZᵀZ / σ² + prior⁻¹)⁻¹
    mu = torch.tensor(22.9, dtype=torch.float64)
    S = torch.linalg.inv(Z.T @ Z / 0.55**2 + torch.linalg.inv(prior_cov))
    mean = S @ Z.T @ (data.diameter - mu) / 0.55**2
    draws = marginal.sample_locals({"mu": mu.expand(1500)}, *args, generator=torch.Generator().manual_seed(0))
    x = torch.cat([draws["a"], draws["b"]], -1)
    assert x.shape == (1500, 30)
    se = S.diagonal().sqrt() / math.sqrt(1500)
    assert ((x.mean(0) - mean).abs() / se).max() < 4.5
    torch.testing.assert_close(x.T.cov(), S, rtol=0, atol=0.2 * S.diagonal().max().item())
    with pytest.raises(ValueError, match="resample"):
        marginal.sample_locals({"mu": mu.expand(2)}, *args, resample=4)
    with pytest.raises(ValueError, match="jointly, by Laplace"):
        LaplaceMarginal(model, unit_plate=("plates", "samples"), quadrature=3)(*args)


def test_the_amortized_guide_with_several_factors_finds_the_exact_gaussian_posterior():
    """Penicillin with known variances: log p̃(μ) is the exact Gaussian
    marginal, so curvi.fit's θ̂ and S are the exact posterior mean and
    precision of μ (antithetic noise cancels on a quadratic)."""
    import curvi
    from curvi import AmortizedLaplaceGuide
    from curvi.factor_guide import AmortizedFactorLaplaceGuide

    data = load_penicillin(dtype=torch.float64)

    def model(plate, sample, y):
        mu = pyro.sample("mu", dist.Normal(20.0, 10.0))
        with pyro.plate("plates", 24):
            a = pyro.sample("a", dist.Normal(0.0, 0.8))
        with pyro.plate("samples", 6):
            b = pyro.sample("b", dist.Normal(0.0, 1.8))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(mu + a[plate] + b[sample], 0.55), obs=y)

    args = (data.plate, data.sample, data.diameter)
    pyro.clear_param_store()
    guide = AmortizedLaplaceGuide(model, unit_plate=("plates", "samples"))
    assert isinstance(guide, AmortizedFactorLaplaceGuide)
    result = curvi.fit(model, guide, *args, progress=False)
    assert result.converged, result.message
    Z = torch.cat(
        [torch.nn.functional.one_hot(data.plate), torch.nn.functional.one_hot(data.sample)], -1
    ).double()
    prior_cov = torch.diag(torch.cat([torch.full((24,), 0.64), torch.full((6,), 1.8**2)])).double()
    cov = Z @ prior_cov @ Z.T + 0.55**2 * torch.eye(144, dtype=torch.float64)
    ones = torch.ones(144, dtype=torch.float64)
    precision = ones @ torch.linalg.solve(cov, ones) + 1 / 100.0
    mean = (ones @ torch.linalg.solve(cov, data.diameter) + 20.0 / 100.0) / precision
    torch.testing.assert_close(guide.loc_global.detach(), mean.reshape(1), rtol=0, atol=1e-6)
    q = pyro.poutine.trace(guide).get_trace(*args)
    (site,) = [s for s in q.nodes.values() if s["type"] == "sample" and "laplace_gaussian" in s["infer"]]
    torch.testing.assert_close(
        site["infer"]["laplace_gaussian"].global_precision, precision.reshape(1, 1), rtol=1e-6, atol=0
    )
    median = guide.median(*args)
    assert median["a"].shape == (24,) and median["b"].shape == (6,)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=3)(*args)
    assert draws["a"].shape == (3, 24)


def test_the_collapsed_elbo_gradient_with_several_factors_matches_finite_differences():
    from curvi import AmortizedLaplaceGuide
    from curvi.particles import CollapsedELBO

    data = crossed_data()
    pyro.clear_param_store()
    guide = AmortizedLaplaceGuide(crossed_model, unit_plate=("subjects", "items"))
    guide(*data)
    (param,) = list(guide.parameters())

    def loss():
        pyro.set_rng_seed(3)
        with guide.holding_global_precision():
            return CollapsedELBO(num_particles=2).differentiable_loss(crossed_model, guide, *data)

    (grad,) = torch.autograd.grad(loss(), [param])
    fd = torch.zeros_like(grad)
    for i in range(grad.numel()):
        with torch.no_grad():
            param[i] += 1e-5
            up = loss()
            param[i] -= 2e-5
            down = loss()
            param[i] += 1e-5
        fd[i] = (up - down) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)


def test_the_amortized_guide_with_several_factors_refuses_one_plate_options():
    from curvi import AmortizedLaplaceGuide

    with pytest.raises(ValueError, match="quadrature"):
        AmortizedLaplaceGuide(crossed_model, unit_plate=("subjects", "items"), quadrature=5)


def penicillin_known_variances(plate, sample, y):
    mu = pyro.sample("mu", dist.Normal(20.0, 10.0))
    with pyro.plate("plates", 24):
        a = pyro.sample("a", dist.Normal(0.0, 0.8))
    with pyro.plate("samples", 6):
        b = pyro.sample("b", dist.Normal(0.0, 1.8))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + a[plate] + b[sample], 0.55), obs=y)


def test_the_laplace_guide_with_several_factors_is_the_exact_gaussian_posterior():
    from curvi import LaplaceGuide
    from curvi.factor_guide import FactorLaplaceGuide

    data = load_penicillin(dtype=torch.float64)
    args = (data.plate, data.sample, data.diameter)
    pyro.clear_param_store()
    guide = LaplaceGuide(penicillin_known_variances, unit_plate=("plates", "samples"))
    assert isinstance(guide, FactorLaplaceGuide)
    trace = pyro.poutine.trace(guide).get_trace(*args)
    (q,) = [s["fn"] for s in trace.nodes.values() if s["type"] == "sample" and s["infer"].get("is_auxiliary")]
    ones = torch.ones(144, 1, dtype=torch.float64)
    Z = torch.cat(
        [ones, torch.nn.functional.one_hot(data.plate), torch.nn.functional.one_hot(data.sample)], -1
    ).double()
    prior = torch.cat(
        [torch.tensor([0.01]), torch.full((24,), 1 / 0.64), torch.full((6,), 1 / 1.8**2)]
    ).double()
    P = Z.T @ Z / 0.55**2 + torch.diag(prior)
    mean = torch.linalg.solve(
        P, Z.T @ data.diameter / 0.55**2 + torch.cat([torch.tensor([0.2]), torch.zeros(30)]).double()
    )
    exact = dist.MultivariateNormal(mean, precision_matrix=P)
    z = exact.sample((4,))
    torch.testing.assert_close(q.log_prob(z), exact.log_prob(z), rtol=0, atol=1e-9)
    torch.testing.assert_close(q.mean, mean, rtol=0, atol=1e-9)
    draws = (
        q.rsample_from_noise(
            torch.eye(31, dtype=torch.float64).unsqueeze(-2).expand(31, 1, 31).reshape(31, 31)
        )
        - mean
    )
    torch.testing.assert_close(draws.T @ draws, torch.linalg.inv(P), rtol=0, atol=1e-10)  # Σ_j z(e_j) z(e_j)ᵀ
    assert guide.median(*args)["a"].shape == (24,)


def test_the_laplace_guide_with_several_factors_is_reparameterised_through_its_precision():
    """The guide's q depends on its parameters through the mean and the
    precision −H(θ̂, x̂). For f(z) = zᵀWz, antithetic basis draws give
    E_q f exactly, so autograd through the draws must give the exact
    gradient of mᵀWm + tr(W P⁻¹), P rebuilt densely from q's pieces."""
    from curvi import LaplaceGuide

    data = crossed_data()
    pyro.clear_param_store()
    guide = LaplaceGuide(crossed_model, unit_plate=("subjects", "items"))
    guide(*data)
    params = list(guide.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    view = guide.view.with_args(*data)
    q = guide._gaussian(view)
    d = q.p + q.n
    W = torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    W = W + W.T
    eye = torch.eye(d, dtype=torch.float64)
    z = torch.cat([q.rsample_from_noise(eye), q.rsample_from_noise(-eye)])
    m = q.mean
    estimate = 0.5 * (z * (z @ W)).sum() - (d - 1) * (m @ W @ m)
    D = q.pattern.to_dense(q.D)
    B = D @ q.DinvB
    S = q.schur_tril @ q.schur_tril.T
    P = torch.cat([torch.cat([S + B.T @ q.DinvB, B.T], 1), torch.cat([B, D], 1)])
    exact = m @ W @ m + torch.trace(W @ torch.linalg.inv(P))
    torch.testing.assert_close(estimate, exact, rtol=1e-10, atol=0)
    grads = torch.autograd.grad(estimate, params, retain_graph=True)
    expected = torch.autograd.grad(exact, params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_a_tuple_of_one_plate_is_the_one_plate_path():
    from curvi import AmortizedLaplaceGuide, LaplaceGuide, LaplaceMarginal, ModelView
    from curvi.guides import LaplaceGuideBase

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", 5):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

    obs = torch.tensor([0.0, 3.0, 1.0, 7.0, 2.0], dtype=torch.float64)
    assert ModelView(model, obs, unit_plate=("groups",)).unit_plate == "groups"
    for Guide in (LaplaceGuide, AmortizedLaplaceGuide):
        guide = Guide(model, unit_plate=["groups"])
        assert isinstance(guide, LaplaceGuideBase) and guide.unit_plate == "groups"
    assert LaplaceMarginal(model, unit_plate=("groups",)).unit_plate == "groups"
