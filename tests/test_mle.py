import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from curvi.datasets import CBPP_GLMMTMB, load_cbpp
from curvi.mle import laplace_mle

# glmmTMB 1.1.5 on this machine: summary(m)$coefficients$cond[, "Std. Error"]
CBPP_GLMMTMB_SE = (0.2324720507, 0.3066424950, 0.3266378085, 0.4274365967)


def cbpp_ml_model(design, herd, size, incidence):
    beta = pyro.param("beta", torch.zeros(4))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("herds", int(herd.max()) + 1):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
    with pyro.plate("obs", len(herd)):
        pyro.sample("y", dist.Binomial(size, logits=design @ beta + u[herd]), obs=incidence)


def test_cbpp_reproduces_glmmtmb():
    data = load_cbpp()
    fit = laplace_mle(cbpp_ml_model, data.design, data.herd, data.size, data.incidence, unit_plate="herds")
    assert fit.converged
    torch.testing.assert_close(
        fit.params["beta"], torch.tensor(CBPP_GLMMTMB["fixed_effects"]), atol=1e-4, rtol=0
    )
    assert abs(fit.params["sigma"].item() - CBPP_GLMMTMB["herd_sd"]) < 1e-4
    assert abs(fit.log_likelihood - CBPP_GLMMTMB["log_likelihood"]) < 1e-5
    torch.testing.assert_close(fit.std_errors["beta"], torch.tensor(CBPP_GLMMTMB_SE), atol=1e-4, rtol=0)
    assert fit.modes["u"].shape == (15,)
    text = fit.summary()
    assert "logLik   -92.026282" in text and "beta[3]" in text and "sigma" in text
    assert pyro.param("sigma").item() == pytest.approx(fit.params["sigma"].item())  # in place


def gaussian_ml_model(obs):
    mu = pyro.param("mu", torch.tensor(0.0))
    tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(u, sigma), obs=obs)


def gaussian_log_likelihood(obs, mu, tau, sigma):
    m = obs.shape[1]
    cov = tau**2 * torch.ones(m, m) + sigma**2 * torch.eye(m)
    return dist.MultivariateNormal(mu.expand(m), cov).log_prob(obs).sum()


def test_gaussian_random_intercept_is_the_closed_form_mle():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(12, 1, generator=g) * 0.8 + torch.randn(12, 5, generator=g) * 0.5 + 1.0
    fit = laplace_mle(gaussian_ml_model, obs, unit_plate="groups")
    assert fit.converged
    mu, tau, sigma = (fit.params[k].clone().requires_grad_() for k in ("mu", "tau", "sigma"))
    exact = gaussian_log_likelihood(obs, mu, tau, sigma)
    assert abs(fit.log_likelihood - exact.item()) < 1e-8
    grads = torch.autograd.grad(exact, (mu, tau, sigma))
    assert max(abs(g.item()) for g in grads) < 1e-5  # the exact likelihood is stationary there


def test_bad_models():
    def with_global_latent(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(mu, 1.0))

    with pytest.raises(ValueError, match=r"global latent sites \['mu'\] must be pyro.param"):
        laplace_mle(with_global_latent, None, unit_plate="groups")

    def without_params():
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no pyro.param sites"):
        laplace_mle(without_params, unit_plate="groups")
