"""Laplace guides on models with masked latents: Pyro's ``obs_mask``
imputation, whose ``<name>_unobserved`` site has entries without density,
and latents under ``poutine.mask`` (issue 13, item 5)."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO

import curvi
from curvi import ModelView
from curvi.guides import AmortizedLaplaceGuide, LaplaceGuide
from curvi.hessian import structured_hessian

G, J, SIGMA = 8, 4, 0.5


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(G, 1, generator=g) + SIGMA * torch.randn(G, J, generator=g)
    mask = torch.rand(G, J, generator=g) > 0.3
    mask[0] = False  # a group with nothing observed
    return obs, mask


def imputation_model(obs, mask):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", G, dim=-2):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        with pyro.plate("obs", J, dim=-1):
            pyro.sample("z", dist.Normal(u, SIGMA), obs=obs, obs_mask=mask)


def observed_only_model(obs, mask):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", G, dim=-2):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        with pyro.plate("obs", J, dim=-1), poutine.mask(mask=mask):
            pyro.sample("z", dist.Normal(u, SIGMA), obs=obs)


def test_entries_without_density_get_a_unit_reference_curvature():
    obs, mask = data()
    view = ModelView(imputation_model, obs, mask, unit_plate="groups")
    H = structured_hessian(view, view.init_theta, view.init_y)
    # local coordinates: u, then z_unobserved's J entries; observed entries have no density
    diagonal = H.D.diagonal(dim1=-2, dim2=-1)[:, 1:]
    torch.testing.assert_close(diagonal[mask], -torch.ones(int(mask.sum())))
    torch.testing.assert_close(diagonal[~mask], torch.full((int((~mask).sum()),), -1 / SIGMA**2))


def test_obs_mask_imputation_is_the_exact_posterior_of_the_missing_entries():
    obs, mask = data()
    guide = AmortizedLaplaceGuide(imputation_model, unit_plate="groups")
    reference = AmortizedLaplaceGuide(observed_only_model, unit_plate="groups")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.1, 0.9]))
    q, q_ref = guide.quantiles([0.1, 0.9], obs, mask), reference.quantiles([0.1, 0.9], obs, mask)
    # the latents are those of the model without the missing entries (linear-Gaussian: exact)
    for name in ("mu", "u"):
        torch.testing.assert_close(q[name], q_ref[name])
    # a missing entry is u + noise: mean of u, variance var(u) + sigma^2
    post = reference.laplace_posterior(obs, mask)
    mean_u = reference.median(obs, mask)["u"].expand(G, J)
    var_u = post.marginal_sd()[1][:, 0:1].expand(G, J) ** 2
    expected = mean_u + z[:, None, None] * (var_u + SIGMA**2).sqrt()
    torch.testing.assert_close(q["z_unobserved"][:, ~mask], expected[:, ~mask])


@pytest.mark.parametrize("Guide", [LaplaceGuide, AmortizedLaplaceGuide])
def test_an_imputation_model_trains_and_predicts(Guide):
    obs, mask = data()
    guide = Guide(imputation_model, unit_plate="groups")
    result = curvi.fit(imputation_model, guide, obs, mask, progress=False, steps=300)
    assert torch.isfinite(torch.tensor(result.final_elbo))
    draws = Predictive(imputation_model, guide=guide, num_samples=5)(obs, mask)
    assert torch.isfinite(draws["z"]).all()
    torch.testing.assert_close(draws["z"][:, mask], obs[mask].expand(5, -1))  # observed entries kept


def test_a_masked_positive_latent_has_no_density_in_the_unconstrained_space_either():
    """Under poutine.mask a latent entry's Jacobian goes with its density: a
    masked LogNormal entry is flat in log space, not the improper e^u."""
    keep = torch.tensor([True, False, True])

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3), poutine.mask(mask=keep):
            s = pyro.sample("s", dist.LogNormal(mu, 1.0))
            pyro.sample("z", dist.Normal(0.0, s), obs=torch.ones(3))

    guide = AmortizedLaplaceGuide(model, unit_plate="groups")
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True).loss(model, guide)
    assert torch.isfinite(torch.tensor(loss))
    log_s = guide.median()["s"].log()
    assert log_s[1] == guide.view.init_y[1, 0]  # no density: stays where it started
    torch.testing.assert_close(guide.laplace_posterior().marginal_sd()[1][1], torch.ones(1))
