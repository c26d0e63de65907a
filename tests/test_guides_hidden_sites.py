"""Laplace guides on blocked models: sites hidden with ``poutine.block`` are
summed out (enumerable discrete sites) or conditioned on the values another
guide of an ``AutoGuideList`` draws; a model whose density is random at fixed
coordinates is refused (issue 13, item 2)."""

import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal

import curvi
from curvi import ModelView
from curvi.guides import AmortizedLaplaceGuide, LaplaceGuide
from curvi.laplace_newton import particle_elbos

GUIDES = [LaplaceGuide, AmortizedLaplaceGuide]
G, J = 12, 5


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    outlier = torch.rand(G, J, generator=g) < 0.3
    clean = 0.6 + 0.5 * torch.randn(G, 1, generator=g) + 0.3 * torch.randn(G, J, generator=g)
    return torch.where(outlier, 3 * torch.randn(G, J, generator=g), clean)


def plain_model(obs):
    """Each observation is an outlier (c = 1) with probability 0.3."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", G, dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", J, dim=-1):
            c = pyro.sample("c", dist.Bernoulli(0.3)).bool()
            loc = torch.where(c, torch.zeros_like(u), u)
            scale = torch.where(c, torch.full_like(u, 3.0), torch.full_like(u, 0.3))
            pyro.sample("z", dist.Normal(loc, scale), obs=obs)


mixture_model = config_enumerate(plain_model)  # Pyro's pattern: the model enumerates c


def summed_out_model(obs):
    """The same model with c summed out by hand."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", G, dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", J, dim=-1):
            locs = torch.stack(torch.broadcast_tensors(u, torch.zeros(J)), -1)
            components = dist.Normal(locs, torch.tensor([0.3, 3.0]))
            pyro.sample(
                "z", dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.7, 0.3])), components), obs=obs
            )


def test_a_hidden_discrete_site_is_summed_out_of_the_log_density():
    obs = data()
    view = ModelView(poutine.block(mixture_model, hide=["c"]), obs, unit_plate="groups")
    reference = ModelView(summed_out_model, obs, unit_plate="groups")
    assert view.hidden.enumerated == ("c",) and view.local_sites == ("u",)
    assert view.separable  # c sits in the unit plate: summed unit by unit
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        theta = torch.randn(2, generator=g)
        y = torch.randn(G, 1, generator=g)
        torch.testing.assert_close(
            view.log_joint(theta, y), reference.log_joint(theta, y), rtol=1e-12, atol=1e-10
        )
        torch.testing.assert_close(view.unit_log_joint(theta, y), reference.unit_log_joint(theta, y))


@pytest.mark.parametrize("Guide", GUIDES)
def test_trace_enum_elbo_with_a_blocked_guide_is_the_elbo_of_the_summed_out_model(Guide):
    obs = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unconverged modes: the density is not random
        guide = Guide(poutine.block(mixture_model, hide=["c"]), unit_plate="groups")
        medians = [float(guide.median(obs)["u"][0]) for _ in range(3)]
    assert medians[0] == medians[1] == medians[2]
    reference = Guide(summed_out_model, unit_plate="groups")
    torch.testing.assert_close(guide.median(obs)["mu"], reference.median(obs)["mu"], rtol=1e-8, atol=1e-8)
    for seed in range(2):
        pyro.set_rng_seed(seed)
        enumerated = TraceEnum_ELBO(max_plate_nesting=2, num_particles=3, vectorize_particles=True)
        value = enumerated.loss(mixture_model, guide, obs)
        pyro.set_rng_seed(seed)
        expected = Trace_ELBO(max_plate_nesting=2, num_particles=3, vectorize_particles=True).loss(
            summed_out_model, reference, obs
        )
        assert abs(value - expected) < 1e-8 * abs(expected)


def test_enumeration_is_refused_under_a_subsampled_unit_plate():
    @config_enumerate
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 10, subsample_size=4):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("z", dist.Normal(u + c, 1.0), obs=torch.zeros(4))

    with pytest.raises(ValueError, match="enumeration.*subsampled unit plate 'groups'"):
        ModelView(poutine.block(model, hide=["c"]), unit_plate="groups")


def test_a_site_hidden_inside_the_model_body_is_refused():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with poutine.block():  # invisible from outside, drawn at random
            shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 4):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            pyro.sample("z", dist.Normal(u + shift, 1.0), obs=torch.zeros(4))

    with pytest.raises(ValueError, match="changes between two evaluations"):
        ModelView(model, unit_plate="groups")


def noise_model(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(u, sigma), obs=obs)


@pytest.mark.parametrize("Guide", GUIDES)
def test_in_an_autoguide_list_hidden_sites_are_conditioned_on_the_other_guides_values(Guide):
    obs = data()
    guide = AutoGuideList(noise_model)
    guide.append(AutoDelta(poutine.block(noise_model, expose=["sigma"])))
    guide.append(Guide(poutine.block(noise_model, hide=["sigma"]), unit_plate="groups"))
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    loss = elbo.loss(noise_model, guide, obs)
    sigma = guide.median(obs)["sigma"]
    # the curvi part is the Laplace guide of the model conditioned on AutoDelta's sigma
    conditioned = Guide(poutine.condition(noise_model, {"sigma": sigma}), unit_plate="groups")
    conditioned(obs)
    conditioned.load_state_dict(guide[1].state_dict())  # the same mean (θ̂, and ŷ for LaplaceGuide)
    expected = conditioned.quantiles([0.1, 0.5, 0.9], obs)
    found = guide[1].quantiles([0.1, 0.5, 0.9], obs)
    for name in ("mu", "tau", "u"):
        torch.testing.assert_close(found[name], expected[name])
    draws = Predictive(noise_model, guide=guide, num_samples=3)(obs)
    assert draws["u"].shape == (3, G, 1) and torch.isfinite(torch.tensor(loss))
    # a guide drawing a different sigma in each vectorized particle cannot be conditioned on
    pyro.clear_param_store()
    guide = AutoGuideList(noise_model)
    guide.append(AutoNormal(poutine.block(noise_model, expose=["sigma"])))
    guide.append(Guide(poutine.block(noise_model, hide=["sigma"]), unit_plate="groups"))
    with pytest.raises(ValueError, match="vectorize_particles=False"):
        elbo.loss(noise_model, guide, obs)
    assert torch.isfinite(torch.tensor(Trace_ELBO(num_particles=2).loss(noise_model, guide, obs)))


@pytest.mark.parametrize("Guide", GUIDES)
def test_the_elbo_gradient_in_the_other_guides_parameters_includes_their_effect_on_the_laplace_part(Guide):
    obs = data()
    guide = AutoGuideList(noise_model)
    guide.append(AutoDelta(poutine.block(noise_model, expose=["sigma"])))
    guide.append(Guide(poutine.block(noise_model, hide=["sigma"]), unit_plate="groups"))
    with pytest.raises(ValueError, match="call the AutoGuideList under poutine.trace"):
        guide(obs)
    poutine.trace(guide).get_trace(obs)
    (sigma_param,) = list(guide[0].parameters())

    def elbo():
        pyro.set_rng_seed(3)
        return -Trace_ELBO(num_particles=2, vectorize_particles=True).differentiable_loss(
            noise_model, guide, obs
        )

    (grad,) = torch.autograd.grad(elbo(), [sigma_param])
    with torch.no_grad():
        sigma_param += 1e-5
        up = elbo()
        sigma_param -= 2e-5
        down = elbo()
        sigma_param += 1e-5
    torch.testing.assert_close(grad, (up - down) / 2e-5, rtol=1e-5, atol=1e-6)


def test_a_hidden_continuous_site_without_a_guide_that_draws_it_is_an_error_at_set_up():
    obs = data()
    guide = AmortizedLaplaceGuide(poutine.block(noise_model, hide=["sigma"]), unit_plate="groups")
    with pytest.raises(ValueError, match=r"\['sigma'\] are hidden .* AutoGuideList"):
        guide(obs)
    pyro.clear_param_store()
    wrong_order = AutoGuideList(noise_model)
    wrong_order.append(AmortizedLaplaceGuide(poutine.block(noise_model, hide=["sigma"]), unit_plate="groups"))
    wrong_order.append(AutoDelta(poutine.block(noise_model, expose=["sigma"])))
    with pytest.raises(ValueError, match="place the guide that owns it before this one"):
        pyro.poutine.trace(wrong_order).get_trace(obs)


@pytest.mark.parametrize("num_particles", [1, 4])
def test_particle_elbos_sum_the_hidden_sites_out_of_the_model(num_particles):
    obs = data()
    guide = AmortizedLaplaceGuide(poutine.block(mixture_model, hide=["c"]), unit_plate="groups")
    reference = AmortizedLaplaceGuide(summed_out_model, unit_plate="groups")
    values = []
    for model, g in ((mixture_model, guide), (summed_out_model, reference)):
        g(obs)  # set up (the two set-ups draw different numbers of random numbers)
        pyro.set_rng_seed(1)
        values.append(
            particle_elbos(
                model, g, obs, num_particles=num_particles, max_plate_nesting=2 + (num_particles > 1)
            )
        )
    assert values[0].shape == (num_particles,)
    torch.testing.assert_close(values[0], values[1])


@pytest.mark.parametrize("Guide", GUIDES)
def test_curvi_fit_by_default_fits_the_summed_out_model(Guide):
    """The default loss sums the hidden site out of the model (whether or not
    the model marks it for enumeration): the fit is the summed-out model's."""
    obs = data()
    results = []
    for model, hide in ((plain_model, ["c"]), (summed_out_model, [])):
        pyro.clear_param_store()
        guide = Guide(poutine.block(model, hide=hide), unit_plate="groups")
        guide(obs)  # set up (the two set-ups draw different numbers of random numbers)
        pyro.set_rng_seed(0)
        fitted = curvi.fit(model, guide, obs, progress=False, steps=20)
        results.append((fitted.elbo, guide.median(obs)["mu"]))
    torch.testing.assert_close(torch.tensor(results[0][0]), torch.tensor(results[1][0]))
    torch.testing.assert_close(results[0][1], results[1][1])
