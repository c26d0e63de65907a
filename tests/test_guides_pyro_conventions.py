"""Laplace guides follow Pyro's autoguide conventions: ``get_posterior()``
returns a torch distribution, and unsupported sites get Pyro's pointers
(issue 13, item 6)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from models import make_poisson_vector

from curvi import ArrowheadNormal
from curvi.guides import AmortizedLaplaceGuide, LaplaceGuide

GUIDES = [LaplaceGuide, AmortizedLaplaceGuide]


@pytest.mark.parametrize("Guide", GUIDES)
def test_get_posterior_is_a_torch_distribution_over_the_unconstrained_latents(Guide):
    model, args, plate = make_poisson_vector()
    guide = Guide(model, unit_plate=plate)
    q = guide.get_posterior(*args)
    assert isinstance(q, torch.distributions.Distribution) and isinstance(q, ArrowheadNormal)
    view = guide.view
    p, N, k = view.global_dim, view.num_units, view.local_dim
    assert q.event_shape == (p + N * k,) and q.batch_shape == ()
    dense = dist.MultivariateNormal(q.mean, precision_matrix=q.precision_matrix)
    post = guide.laplace_posterior(*args)
    torch.testing.assert_close(q.mean, view.flatten(post.loc_theta, post.loc_y))
    torch.testing.assert_close(q.covariance_matrix, dense.covariance_matrix)
    torch.testing.assert_close(q.variance, dense.variance)
    torch.testing.assert_close(q.entropy(), dense.entropy())
    x = q.sample((7,))
    assert x.shape == (7, p + N * k)
    torch.testing.assert_close(q.log_prob(x), dense.log_prob(x))
    torch.testing.assert_close(q.log_prob(x.reshape(7, 1, -1)), dense.log_prob(x).reshape(7, 1))
    # the draws have the covariance (a loose Monte Carlo check)
    draws = q.sample((20000,))
    assert ((draws.var(0) / q.variance - 1).abs() < 0.05).all()
    # the constrained values of a draw are what the view maps it to
    theta, y = view.split(x[0])
    assert set(view.unpack(theta, y)) == {"mu", "tau", "w"}


@pytest.mark.parametrize("Guide", GUIDES)
def test_a_spherical_site_gets_pyros_pointer_to_the_reparameterizer(Guide):
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            pyro.sample("direction", dist.ProjectedNormal(torch.ones(3, 2)))

    with pytest.raises(ValueError, match=r"spherical sample site 'direction'.*ProjectedNormalReparam"):
        Guide(model, unit_plate="groups")()


@pytest.mark.parametrize("Guide", GUIDES)
def test_a_visible_discrete_site_gets_pyros_pointer_to_enumeration(Guide):
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("z", dist.Normal(mu + c, 1.0), obs=torch.zeros(3))

    with pytest.raises(ValueError, match=r"discrete sample site 'c'.*enumeration.*hide=\['c'\]"):
        Guide(model)()
