"""curvi.arviz.to_inference_data: each group against a hand computation."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

import curvi.arviz as curvi_arviz
from curvi import LaplaceMarginal
from curvi.arviz import to_inference_data

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
SCHOOLS = list("ABCDEFGH")


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def school_draws(num=400):
    """Draws of the right shapes and support (the export is checked, not a fit)."""
    g = torch.Generator().manual_seed(1)
    mu = 4.0 + 3.0 * torch.randn(num, generator=g)
    tau = 3.0 * torch.randn(num, generator=g).exp()
    theta = mu[:, None] + tau[:, None] * torch.randn(num, 8, generator=g)
    return {"mu": mu, "tau": tau, "theta": theta}


def schools_idata(num_chains=2, **options):
    return to_inference_data(
        eight_schools,
        school_draws(),
        Y,
        SIGMA,
        coords={"school": SCHOOLS},
        dims={"theta": ["school"], "obs": ["school"]},
        num_chains=num_chains,
        **options,
    )


def hand_log_lik(draws):
    return dist.Normal(draws["theta"], SIGMA).log_prob(Y)  # (S, 8)


def test_posterior_summary_means_are_the_draws_means_by_site_and_school():
    draws = school_draws()
    idata = schools_idata()
    summary = az.summary(idata, kind="stats", round_to="none")
    assert summary.loc["mu", "mean"] == pytest.approx(float(draws["mu"].mean()), rel=1e-12)
    assert summary.loc["tau", "mean"] == pytest.approx(float(draws["tau"].mean()), rel=1e-12)
    for j, school in enumerate(SCHOOLS):
        expected = float(draws["theta"][:, j].mean())
        assert summary.loc[f"theta[{school}]", "mean"] == pytest.approx(expected, rel=1e-12)
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert list(idata.posterior["school"].values) == SCHOOLS
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 200
    # chains are consecutive blocks of the draws
    np.testing.assert_array_equal(idata.posterior["theta"].values[1, 0], draws["theta"][200].numpy())
    assert idata.observed_data["obs"].dims == ("school",)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, Y.numpy())
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "school")
    assert idata.posterior_predictive["obs"].dims == ("chain", "draw", "school")


def test_pointwise_log_likelihood_is_each_draws_log_prob():
    draws = school_draws()
    idata = schools_idata()
    log_lik = idata.log_likelihood["obs"].values  # (2, 200, 8)
    assert log_lik.shape == (2, 200, 8)
    by_hand = hand_log_lik(draws)
    for s in (0, 17, 200, 399):
        np.testing.assert_allclose(log_lik[s // 200, s % 200], by_hand[s].numpy(), rtol=1e-12)


def test_waic_and_loo_match_hand_formulas():
    draws = school_draws()
    idata = schools_idata(num_chains=1)
    ll = hand_log_lik(draws).numpy()  # (S, n)
    num = ll.shape[0]
    lppd = (np.logaddexp.reduce(ll, axis=0) - math.log(num)).sum()
    p_waic = ll.var(axis=0).sum()  # ArviZ 0.23 takes the variance over draws with ddof=0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        waic = az.waic(idata)
        loo = az.loo(idata)
    assert waic.elpd_waic == pytest.approx(lppd - p_waic, rel=1e-10)
    assert waic.p_waic == pytest.approx(p_waic, rel=1e-10)
    log_weights, _ = az.psislw(-ll.T, reff=1.0)  # (n, S): smoothed, normalised, per observation
    elpd_loo = np.logaddexp.reduce(log_weights + ll.T, axis=1).sum()
    assert loo.elpd_loo == pytest.approx(elpd_loo, rel=1e-10)


def test_posterior_predictive_has_the_observed_shape_and_the_predictive_mean():
    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", 5):
            pyro.sample("y", dist.Normal(mu, 0.5), obs=obs)

    num = 4000
    mu = 1.0 + torch.randn(num)
    idata = to_inference_data(model, {"mu": mu}, torch.zeros(5), num_chains=4)
    rep = torch.as_tensor(idata.posterior_predictive["y"].values).reshape(num, 5)
    assert idata.posterior_predictive["y"].shape == (4, 1000, 5)
    residual = rep - mu[:, None]  # replicates around their own draw: N(0, 0.5)
    assert abs(float(residual.mean())) < 4 * 0.5 / math.sqrt(residual.numel())
    assert float(residual.std()) == pytest.approx(0.5, rel=0.05)
    predictive_mean = float(mu.mean())  # E[y_rep] = E[mu] over the draws
    se = math.sqrt(float(mu.var()) + 0.25) / math.sqrt(num)
    assert abs(float(rep.mean(0)[2]) - predictive_mean) < 4 * se


def test_two_observed_sites_and_their_dims():
    def model(x, y, counts):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", len(y)):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)
        with pyro.plate("cells", counts.shape[0], dim=-2), pyro.plate("cols", counts.shape[1], dim=-1):
            pyro.sample("c", dist.Poisson(a.exp()), obs=counts)

    x, y = torch.linspace(-1, 1, 6), torch.randn(6)
    counts = torch.poisson(torch.full((3, 2), 2.0))
    a, b = 0.3 * torch.randn(300) + 0.5, 0.2 * torch.randn(300)
    idata = to_inference_data(
        model,
        {"a": a, "b": b},
        x,
        y,
        counts,
        dims={"c": ["cell", "col"]},
        coords={"col": ["left", "right"]},
    )
    assert set(idata.log_likelihood.data_vars) == {"y", "c"}
    assert idata.log_likelihood["c"].dims == ("chain", "draw", "cell", "col")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "y_dim_0")
    assert list(idata.observed_data["col"].values) == ["left", "right"]
    np.testing.assert_allclose(
        idata.log_likelihood["c"].values[0, 7], dist.Poisson(a[7].exp()).log_prob(counts).numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(
        idata.log_likelihood["y"].values[0, 9],
        dist.Normal(a[9] + b[9] * x, 1.0).log_prob(y).numpy(),
        rtol=1e-12,
    )
    assert idata.posterior_predictive["c"].shape == (1, 300, 3, 2)
    assert idata.posterior_predictive["y"].shape == (1, 300, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert np.isfinite(az.loo(idata, var_name="c").elpd_loo)
    with pytest.raises(ValueError, match=r"site 'c': dimension 'row' has size 3, but 6 in site 'y'"):
        to_inference_data(model, {"a": a, "b": b}, x, y, counts, dims={"y": ["row"], "c": ["row", "col"]})
    only = to_inference_data(model, {"a": a, "b": b}, x, y, counts, observed=["y"])
    assert set(only.log_likelihood.data_vars) == {"y"} and set(only.observed_data.data_vars) == {"y"}


def test_scale_and_mask_apply_to_the_pointwise_log_likelihood():
    mask = torch.tensor([True, False, True, True])

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4), poutine.scale(scale=2.5), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=obs)

    obs, mu = torch.randn(4), torch.randn(50)
    idata = to_inference_data(model, {"mu": mu}, obs)
    expected = 2.5 * dist.Normal(mu[:, None], 1.0).log_prob(obs) * mask
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected.numpy(), rtol=1e-12)
    assert (idata.log_likelihood["y"].values[..., 1] == 0).all()


def test_obs_mask_exports_the_observed_part_and_factors_are_not_observations():
    def model(y, present):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -(mu**2))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=present)

    y, present = torch.randn(5), torch.tensor([True, True, False, True, False])
    draws = {"mu": torch.randn(60), "y_unobserved": torch.randn(60, 5)}
    idata = to_inference_data(model, draws, y, present)
    assert set(idata.observed_data.data_vars) == {"y_observed"}
    expected = dist.Normal(draws["mu"][:, None], 1.0).log_prob(y) * present
    np.testing.assert_allclose(idata.log_likelihood["y_observed"].values[0], expected.numpy(), rtol=1e-12)
    filled = torch.where(present, y, draws["y_unobserved"])  # the model's deterministic "y"
    np.testing.assert_allclose(idata.posterior["y"].values[0], filled.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="'penalty' is a pyro.factor term"):
        to_inference_data(model, {**draws, "penalty": torch.zeros(60)}, y, present)


def test_unit_plate_keeps_its_trailing_singleton_and_laplace_marginal_draws_export():
    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, tau))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

    obs = torch.poisson(torch.full((5, 3), 3.0))
    globals_ = {"mu": 1.1 + 0.1 * torch.randn(40), "tau": 0.3 + 0.05 * torch.rand(40)}
    units = LaplaceMarginal(model, unit_plate="groups").sample_locals(globals_, obs)
    draws = {**globals_, **units}
    idata = to_inference_data(model, draws, obs, dims={"u": ["group", "one"], "z": ["group", "rep"]})
    assert idata.posterior["u"].shape == (1, 40, 5, 1)
    assert idata.posterior_predictive["z"].shape == (1, 40, 5, 3)
    expected = dist.Poisson(units["u"][11].exp()).log_prob(obs)
    np.testing.assert_allclose(idata.log_likelihood["z"].values[0, 11], expected.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"dims\['u'\].*site 'u' has 2"):
        to_inference_data(model, draws, obs, dims={"u": ["group"]})


def test_deterministic_sites_are_computed_and_a_model_that_does_not_broadcast_falls_back(monkeypatch):
    def broadcasting(x, y):  # as for vectorized ELBO particles: w is (S, 1, 2) under the plate of draws
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.deterministic("slope", w[..., 1] * 2)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(w[..., 0] + w[..., 1] * x, 1.0), obs=y)

    def failing(x, y):  # w[0] + w[1] * x: a shape error under a plate of draws
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.deterministic("slope", w[1] * 2)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(w[0] + w[1] * x, 1.0), obs=y)

    def silently_wrong(x, y):  # under a plate of draws, every draw would use the first draw's w
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        a, b = w.reshape(-1)[0], w.reshape(-1)[1]
        pyro.deterministic("slope", w[..., 1] * 2)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)

    x, y = torch.linspace(-1, 1, 7), torch.randn(7)
    w = torch.randn(30, 2)
    calls = []
    one_draw = curvi_arviz._one_draw
    monkeypatch.setattr(curvi_arviz, "_one_draw", lambda *a, **k: calls.append(1) or one_draw(*a, **k))
    for fn in (broadcasting, failing, silently_wrong):
        calls.clear()
        idata = to_inference_data(fn, {"w": w}, x, y)
        if fn is broadcasting:
            assert len(calls) == 3  # vectorised, checked at three draws
        elif fn is failing:
            assert len(calls) == 30  # the loop
        else:
            assert 30 < len(calls) <= 33  # checks that fail, then the loop
        np.testing.assert_allclose(idata.posterior["slope"].values[0], (2 * w[:, 1]).numpy(), rtol=1e-12)
        expected = dist.Normal(w[:, :1] + w[:, 1:] * x, 1.0).log_prob(y)
        np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected.numpy(), rtol=1e-12)
        assert idata.posterior_predictive["y"].shape == (1, 30, 7)


def test_bad_input_names_the_site():
    draws = school_draws(40)
    export = lambda d, **o: to_inference_data(eight_schools, d, Y, SIGMA, **o)
    with pytest.raises(ValueError, match=r"no site 'thetta'.*\['mu', 'tau', 'theta'\]"):
        export({**draws, "thetta": draws["theta"]})
    with pytest.raises(ValueError, match=r"draws\['tau'\] has 1 entries that are NaN"):
        export({**draws, "tau": torch.cat([draws["tau"][:-1], torch.tensor([math.nan])])})
    with pytest.raises(ValueError, match="disagree on the number of draws"):
        export({**draws, "mu": draws["mu"][:-1]})
    with pytest.raises(ValueError, match=r"draws\['theta'\] has shape \(40, 8, 1\)"):
        export({**draws, "theta": draws["theta"][..., None]})
    with pytest.raises(ValueError, match=r"'obs' is an observed site"):
        export({**draws, "obs": draws["theta"]})
    with pytest.raises(ValueError, match=r"lack the model's latent site\(s\) \['theta'\]"):
        export({"mu": draws["mu"], "tau": draws["tau"]})
    alone = export({"mu": draws["mu"]}, posterior_predictive=False, log_likelihood=False)
    assert set(alone.groups()) == {"posterior", "observed_data"}
    with pytest.raises(ValueError, match=r"dims\['theta'\] = \['school', 'x'\] names 2"):
        export(draws, dims={"theta": ["school", "x"]})
    with pytest.raises(
        ValueError, match=r"site 'theta': dimension 'school' has size 8 but coords\['school'\] has 7"
    ):
        export(draws, dims={"theta": ["school"]}, coords={"school": SCHOOLS[:7]})
    with pytest.raises(ValueError, match=r"num_chains=3"):
        export(draws, num_chains=3)
    with pytest.raises(ValueError, match=r"observed: 'y' is not an observed site.*\['obs'\]"):
        export(draws, observed=["y"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_draws_and_data_on_the_gpu():
    draws = {k: v.cuda() for k, v in school_draws(40).items()}
    idata = to_inference_data(eight_schools, draws, Y.cuda(), SIGMA.cuda())
    np.testing.assert_allclose(
        idata.log_likelihood["obs"].values[0], hand_log_lik({k: v.cpu() for k, v in draws.items()}).numpy()
    )
