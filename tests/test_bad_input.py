"""Bad input, end to end: the mistakes users make, fed to each public entry
point, and a clear error or warning naming the site, plate or argument --
never a NaN or a corrupted parameter store handed back in silence.

curvi evaluates models with Pyro's validation off (``torch.func`` cannot
run its data-dependent checks), so the observed values are checked when a
view of the model is made and when it is given new data
(:func:`curvi.model.check_observed`); these tests hold every entry point to
that. (The formula front end's mistakes -- a missing column, a grouping
factor with one level -- live with its own tests.)
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

import curvi
from curvi import (
    AmortizedLaplaceGuide,
    LaplaceGuide,
    LaplaceMarginal,
    LaplaceNewton,
    ModeConvergenceWarning,
    ModelView,
    NaturalGradient,
    dense_hessian,
    laplace_log_marginal,
    laplace_mle,
    psis,
    solve_modes,
    structured_hessian,
)

# ---------------------------------------------------------------------------
# models and data (float64: tests/conftest.py sets the default dtype)


def hier(obs):
    """Gaussian random intercepts: unit plate 'groups' (dim -2), observations in 'obs'."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(u, 0.5), obs=obs)


def hier_mle(obs):
    mu = pyro.param("mu", torch.tensor(0.0))
    tau = pyro.param("tau", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("groups", obs.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(mu, tau))
        with pyro.plate("obs", obs.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(u, 0.5), obs=obs)


def crossed(a_idx, b_idx, counts):
    """Poisson counts with crossed random effects: unit plates 'a' and 'b'."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("a", int(a_idx.max()) + 1):
        a = pyro.sample("ua", dist.Normal(0.0, 1.0))
    with pyro.plate("b", int(b_idx.max()) + 1):
        b = pyro.sample("ub", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(counts)):
        pyro.sample("c", dist.Poisson((mu + a[..., a_idx] + b[..., b_idx]).exp()), obs=counts)


def crossed_mle(a_idx, b_idx, counts):
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("a", int(a_idx.max()) + 1):
        a = pyro.sample("ua", dist.Normal(0.0, 1.0))
    with pyro.plate("b", int(b_idx.max()) + 1):
        b = pyro.sample("ub", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(counts)):
        pyro.sample("c", dist.Poisson((mu + a[..., a_idx] + b[..., b_idx]).exp()), obs=counts)


def hier_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=g, dtype=torch.float64) + torch.randn(5, 1, generator=g)


def crossed_data():
    g = torch.Generator().manual_seed(1)
    a_idx, b_idx = torch.arange(12) % 4, torch.arange(12) % 3
    return a_idx, b_idx, torch.poisson(torch.full((12,), 2.0, dtype=torch.float64), generator=g)


def traced(marginal, *args):
    """Run a LaplaceMarginal as inference would (inside a trace)."""
    return poutine.trace(marginal).get_trace(*args)


def on_a_view(function, model=hier):
    """``function(view, theta, y)`` on a view made on good data and given the
    bad data through ``with_args`` (the route of every later call)."""

    def call(bad, good):
        view = ModelView(model, good, unit_plate="groups")
        return function(view.with_args(bad), view.init_theta, view.init_y)

    return call


def amortized(model):
    """An amortized guide started at init_loc_fn's point (quick to set up)."""
    return AmortizedLaplaceGuide(model, unit_plate="groups", init_to_mode=False)


def later_call(make_guide, model=hier):
    """A guide set up on good data, then called on bad data of the same shapes."""

    def call(bad, good):
        guide = make_guide(model)
        guide(*good) if isinstance(good, tuple) else guide(good)
        return guide(*bad) if isinstance(bad, tuple) else guide(bad)

    return call


def marginal_later_call(bad, good):
    marginal = LaplaceMarginal(hier, unit_plate="groups")
    traced(marginal, good)
    return traced(marginal, bad)


def psis_on_other_data(bad, good):
    guide = LaplaceGuide(hier, unit_plate="groups", init_to_mode=False)
    guide(good)
    return psis(hier, guide, bad, num_samples=4)


# ---------------------------------------------------------------------------
# entry points, each as ``call(bad_data, good_data)``

ONE_PLATE = {
    "LaplaceGuide": lambda bad, good: LaplaceGuide(hier, unit_plate="groups")(bad),
    "AmortizedLaplaceGuide": lambda bad, good: AmortizedLaplaceGuide(hier, unit_plate="groups")(bad),
    "fit": lambda bad, good: curvi.fit(
        hier, AmortizedLaplaceGuide(hier, unit_plate="groups"), bad, steps=2, progress=False
    ),
    "LaplaceNewton": lambda bad, good: curvi.fit(
        hier, AmortizedLaplaceGuide(hier, unit_plate="groups"), bad, optim=LaplaceNewton(), progress=False
    ),
    "laplace_mle": lambda bad, good: laplace_mle(hier_mle, bad, unit_plate="groups"),
    "LaplaceMarginal": lambda bad, good: traced(LaplaceMarginal(hier, unit_plate="groups"), bad),
    "LaplaceMarginal later call": marginal_later_call,
    "guide later call": later_call(amortized),
    "ModelView.with_args": on_a_view(lambda view, theta, y: view),
    "laplace_log_marginal": on_a_view(laplace_log_marginal),
    "solve_modes": on_a_view(solve_modes),
    "structured_hessian": on_a_view(structured_hessian),
    "dense_hessian": on_a_view(dense_hessian),
    "psis": psis_on_other_data,
}

SEVERAL_PLATES = {
    "LaplaceGuide": lambda bad, good: LaplaceGuide(crossed, unit_plate=("a", "b"))(*bad),
    "AmortizedLaplaceGuide": lambda bad, good: AmortizedLaplaceGuide(crossed, unit_plate=("a", "b"))(*bad),
    "laplace_mle": lambda bad, good: laplace_mle(crossed_mle, *bad, unit_plate=("a", "b")),
    "LaplaceMarginal": lambda bad, good: traced(LaplaceMarginal(crossed, unit_plate=("a", "b")), *bad),
    "guide later call": later_call(lambda m: AmortizedLaplaceGuide(m, unit_plate=("a", "b")), crossed),
}


def with_entry(data, index, value):
    data = data.clone()
    data[index] = value
    return data


# ---------------------------------------------------------------------------
# NaN and infinite data


NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_nan_and_infinite_data_are_refused_naming_the_site_the_entry_and_the_fix(value):
    bad = with_entry(with_entry(hier_data(), (1, 2), value), (3, 0), value)
    match = (
        rf"observed site 'z' holds 2 NaN or infinite value\(s\) of 15 \(the first is {value} at index "
        r"\(1, 2\)\); drop them, or mask them out \(obs_mask=, poutine.mask\)"
    )
    with pytest.raises(ValueError, match=match):
        ModelView(hier, bad, unit_plate="groups")


@pytest.mark.parametrize("entry", ONE_PLATE)
def test_non_finite_data_are_refused_by_every_entry_point(entry):
    good = hier_data()
    value = NON_FINITE[list(ONE_PLATE).index(entry) % 3]  # each entry point one of them
    bad = with_entry(good, (2, 1), value)
    with pytest.raises(ValueError, match=r"observed site 'z' holds 1 NaN or infinite value.*index \(2, 1\)"):
        ONE_PLATE[entry](bad, good)


@pytest.mark.parametrize("entry", SEVERAL_PLATES)
def test_non_finite_counts_are_refused_with_several_grouping_factors(entry):
    good = crossed_data()
    bad = (*good[:2], with_entry(good[2], 5, math.nan))
    with pytest.raises(ValueError, match=r"observed site 'c' holds 1 NaN or infinite value.*index \(5,\)"):
        SEVERAL_PLATES[entry](bad, good)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_natural_gradient_names_the_site_of_non_finite_data(value):
    bad = with_entry(hier_data(), (0, 2), value)
    optim = NaturalGradient(lr=0.5, num_samples=4)
    # NaN: Pyro's own validation (in the ELBO); inf: a real Normal accepts it,
    # and the step names the site whose density is not finite
    with pytest.raises(ValueError, match="site 'z'|sites whose log density is not finite.*'z'"):
        curvi.fit(
            hier, AutoMultivariateNormal(hier), bad, optim=optim, loss=optim.loss, steps=2, progress=False
        )


@pytest.mark.parametrize("how", ["poutine.mask", "obs_mask"])
def test_missing_values_under_a_mask_are_not_refused(how):
    obs = with_entry(hier_data(), (1, 1), math.nan)  # a missing value ...
    mask = torch.isfinite(obs)  # ... masked out

    def masked(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                if how == "obs_mask":  # Pyro imputes it: a latent z_unobserved
                    pyro.sample("z", dist.Normal(u, 0.5), obs=obs, obs_mask=mask)
                else:
                    with poutine.mask(mask=mask):
                        pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

    view = ModelView(masked, obs, unit_plate="groups")
    assert torch.isfinite(view.log_joint(view.init_theta, view.init_y))


# ---------------------------------------------------------------------------
# count families given negative or fractional data


def count_model(family):
    def model(counts):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", counts.shape[0]):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            if family == "Poisson":
                fn = dist.Poisson(u.exp())
            elif family == "Binomial":
                fn = dist.Binomial(10, logits=u)
            else:
                fn = dist.NegativeBinomial(5.0, logits=u)
            pyro.sample("c", fn, obs=counts)

    return model


COUNT_ENTRIES = {
    "LaplaceGuide": lambda model, bad, good: LaplaceGuide(model, unit_plate="groups")(bad),
    "fit": lambda model, bad, good: curvi.fit(
        model, AmortizedLaplaceGuide(model, unit_plate="groups"), bad, steps=2, progress=False
    ),
    "LaplaceMarginal": lambda model, bad, good: traced(LaplaceMarginal(model, unit_plate="groups"), bad),
    "guide later call": lambda model, bad, good: later_call(amortized, model)(bad, good),
}

SUPPORTS = {
    "Poisson": "non-negative integers",
    "Binomial": "integers from 0 to total_count",
    "NegativeBinomial": "non-negative integers",
}


def count_message(family, value):
    return (
        f"observed site 'c' has 1 of 4 values outside the support of its {family} distribution "
        rf"\({SUPPORTS[family]}\); the first is {value} at index \(1,\)"
    )


@pytest.mark.parametrize("value", [-3.0, 2.5], ids=["negative", "fractional"])
@pytest.mark.parametrize("family", ["Poisson", "Binomial", "NegativeBinomial"])
def test_counts_outside_the_support_are_refused_naming_the_site(family, value):
    bad = torch.tensor([0.0, value, 1.0, 2.0])
    with pytest.raises(ValueError, match=count_message(family, value)):
        ModelView(count_model(family), bad, unit_plate="groups")


@pytest.mark.parametrize("entry", COUNT_ENTRIES)
def test_bad_counts_are_refused_by_every_entry_point(entry):
    i = list(COUNT_ENTRIES).index(entry)
    family, value = ["Poisson", "Binomial", "NegativeBinomial"][i % 3], [2.5, -3.0][i % 2]
    good = torch.tensor([0.0, 3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=count_message(family, value)):
        COUNT_ENTRIES[entry](count_model(family), with_entry(good, 1, value), good)


def test_a_binomial_count_above_its_total_is_refused():
    with pytest.raises(
        ValueError, match=r"observed site 'c' .* Binomial .* the first is 12.0 at index \(1,\)"
    ):
        LaplaceGuide(count_model("Binomial"), unit_plate="groups")(torch.tensor([0.0, 12.0, 1.0, 2.0]))


def test_laplace_mle_refuses_fractional_counts():
    def model(counts):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("groups", len(counts)):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            pyro.sample("c", dist.Poisson(u.exp()), obs=counts)

    with pytest.raises(
        ValueError, match="observed site 'c' has 1 of 4 values outside the support of its Poisson"
    ):
        laplace_mle(model, torch.tensor([0.0, 2.5, 1.0, 2.0]), unit_plate="groups")


@pytest.mark.parametrize("entry", SEVERAL_PLATES)
def test_fractional_counts_are_refused_with_several_grouping_factors(entry):
    good = crossed_data()
    bad = (*good[:2], with_entry(good[2], 3, 0.5))
    with pytest.raises(ValueError, match=r"observed site 'c' has 1 of 12 values outside the support .* 0.5"):
        SEVERAL_PLATES[entry](bad, good)


def test_the_support_check_follows_pyros_validation_switch():
    # with validation off (pyro.enable_validation(False)) Pyro takes a
    # fractional count; so does curvi -- the user's choice
    model = count_model("Poisson")
    with pyro.validation_enabled(False):
        view = ModelView(model, torch.tensor([0.0, 2.5, 1.0, 2.0]), unit_plate="groups")
    assert torch.isfinite(view.log_joint(view.init_theta, view.init_y))


# ---------------------------------------------------------------------------
# shapes that disagree with a plate


def fixed_plate(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", 5):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.sample("z", dist.Normal(u, 1.0), obs=obs)


def fixed_plate_mle(obs):
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("groups", 5):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.sample("z", dist.Normal(u, 1.0), obs=obs)


SHAPE_ENTRIES = {
    "ModelView": lambda obs: ModelView(fixed_plate, obs, unit_plate="groups"),
    "LaplaceGuide": lambda obs: LaplaceGuide(fixed_plate, unit_plate="groups")(obs),
    "AmortizedLaplaceGuide": lambda obs: AmortizedLaplaceGuide(fixed_plate, unit_plate="groups")(obs),
    "laplace_mle": lambda obs: laplace_mle(fixed_plate_mle, obs, unit_plate="groups"),
    "LaplaceMarginal": lambda obs: traced(LaplaceMarginal(fixed_plate, unit_plate="groups"), obs),
    "ModelView.with_args": lambda obs: ModelView(fixed_plate, torch.zeros(5), unit_plate="groups").with_args(
        obs
    ),
}


@pytest.mark.parametrize("shape", [(4,), (10,), (5, 2)])
@pytest.mark.parametrize("entry", SHAPE_ENTRIES)
def test_observations_that_disagree_with_a_plate_are_refused_naming_site_and_plate(entry, shape):
    expected = (
        rf"observed site 'z' has shape \({', '.join(map(str, shape))},?\), but it sits in plate 'groups' "
        rf"of size 5 \(dim -1\), along which it has {shape[-1]} entries"
    )
    with pytest.raises(ValueError, match=expected):
        SHAPE_ENTRIES[entry](torch.zeros(shape))


# ---------------------------------------------------------------------------
# a unit plate the model does not have


NOPE = {
    "LaplaceGuide": lambda p: LaplaceGuide(hier, unit_plate=p)(hier_data()),
    "AmortizedLaplaceGuide": lambda p: AmortizedLaplaceGuide(hier, unit_plate=p)(hier_data()),
    "fit": lambda p: curvi.fit(hier, AmortizedLaplaceGuide(hier, unit_plate=p), hier_data(), progress=False),
    "laplace_mle": lambda p: laplace_mle(hier_mle, hier_data(), unit_plate=p),
    "LaplaceMarginal": lambda p: traced(LaplaceMarginal(hier, unit_plate=p), hier_data()),
    "ModelView": lambda p: ModelView(hier, hier_data(), unit_plate=p),
}


@pytest.mark.parametrize("plate", ["nope", ("nope",), ("groups", "nope"), ("nope", "groups")], ids=str)
@pytest.mark.parametrize("entry", NOPE)
def test_a_missing_unit_plate_is_named_with_the_plates_the_model_has(entry, plate):
    if entry == "ModelView" and isinstance(plate, tuple) and len(plate) > 1:
        pytest.skip("ModelView takes one unit plate (FactorView takes several)")
    with pytest.raises(
        ValueError, match=r"the model has no plate named 'nope'; its plates are \['groups', 'obs'\]"
    ):
        NOPE[entry](plate)


# ---------------------------------------------------------------------------
# a discrete latent under a Laplace guide


def discrete_local(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", 5):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("z", dist.Normal(u + k, 1.0), obs=obs)


def discrete_global(obs):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    k = pyro.sample("k", dist.Bernoulli(0.5))
    with pyro.plate("groups", 5):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.sample("z", dist.Normal(u + k, 1.0), obs=obs)


def discrete_crossed(a_idx, b_idx, counts):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("a", int(a_idx.max()) + 1):
        a = pyro.sample("ua", dist.Normal(0.0, 1.0))
        k = pyro.sample("k", dist.Bernoulli(0.5))
    with pyro.plate("b", int(b_idx.max()) + 1):
        b = pyro.sample("ub", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(counts)):
        pyro.sample("c", dist.Poisson((mu + a[..., a_idx] + b[..., b_idx] + k[..., a_idx]).exp()), obs=counts)


DISCRETE = {
    "LaplaceGuide local": lambda: LaplaceGuide(discrete_local, unit_plate="groups")(torch.zeros(5)),
    "LaplaceGuide global": lambda: LaplaceGuide(discrete_global, unit_plate="groups")(torch.zeros(5)),
    "LaplaceGuide no plate": lambda: LaplaceGuide(discrete_global)(torch.zeros(5)),
    "AmortizedLaplaceGuide": lambda: AmortizedLaplaceGuide(discrete_local, unit_plate="groups")(
        torch.zeros(5)
    ),
    "LaplaceMarginal": lambda: traced(LaplaceMarginal(discrete_local, unit_plate="groups"), torch.zeros(5)),
    "fit": lambda: curvi.fit(
        discrete_local,
        AmortizedLaplaceGuide(discrete_local, unit_plate="groups"),
        torch.zeros(5),
        progress=False,
    ),
    "LaplaceGuide (a, b)": lambda: LaplaceGuide(discrete_crossed, unit_plate=("a", "b"))(*crossed_data()),
    "AmortizedLaplaceGuide (a, b)": lambda: AmortizedLaplaceGuide(discrete_crossed, unit_plate=("a", "b"))(
        *crossed_data()
    ),
}


@pytest.mark.parametrize("entry", DISCRETE)
def test_a_discrete_latent_is_named_with_the_way_to_sum_it_out(entry):
    with pytest.raises(ValueError, match=r"discrete sample site 'k'.*poutine.block\(model, hide=\['k'\]\)"):
        DISCRETE[entry]()


def test_laplace_mle_names_a_discrete_latent():
    def model(obs):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("groups", 5):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("z", dist.Normal(u + k, 1.0), obs=obs)

    with pytest.raises(ValueError, match="discrete sample site 'k'"):
        laplace_mle(model, torch.zeros(5), unit_plate="groups")


# ---------------------------------------------------------------------------
# an inner mode solve that cannot converge


def no_mode(counts):
    """Unit 0 has no counts and its latent a flat density: its conditional
    log density, -exp(mu + u), rises for ever as u falls (Newton: -1 a step)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", counts.shape[0]):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.factor("flat", 0.5 * u**2)  # cancels the prior
        pyro.sample("c", dist.Poisson((mu + u).exp()), obs=counts)


def no_mode_data():
    return torch.tensor([0.0, 3.0, 1.0, 2.0])


def all_finite(values):
    return all(torch.isfinite(v).all() for v in values.values())


NO_MODE = {  # the guides start at init_loc_fn's θ: the units' solve is the point here
    "LaplaceGuide": lambda obs: LaplaceGuide(no_mode, unit_plate="groups", init_to_mode=False)(obs),
    "AmortizedLaplaceGuide": lambda obs: AmortizedLaplaceGuide(
        no_mode, unit_plate="groups", init_to_mode=False, max_iter=5
    )(obs),
    "LaplaceMarginal": lambda obs: {
        name: site["value"]
        for name, site in traced(LaplaceMarginal(no_mode, unit_plate="groups"), obs).nodes.items()
        if site["type"] == "sample"
    },
}


@pytest.mark.parametrize("entry", NO_MODE)
def test_a_unit_without_a_mode_is_named_by_a_warning_and_nothing_is_nan(entry):
    match = r"1 of 4 units did not reach their conditional mode in \d+ Newton iterations \(units 0\)"
    with pytest.warns(ModeConvergenceWarning, match=match):
        values = NO_MODE[entry](no_mode_data())
    assert all_finite(values)


def test_solve_modes_and_the_laplace_marginal_report_the_unit_without_a_mode():
    view = ModelView(no_mode, no_mode_data(), unit_plate="groups")
    result = solve_modes(view, view.init_theta, view.init_y)
    assert result.converged.tolist() == [False, True, True, True]
    assert torch.isfinite(result.y).all() and torch.isfinite(result.precision).all()
    value, modes = laplace_log_marginal(view, view.init_theta, view.init_y, max_iter=1)
    assert torch.isfinite(value) and not modes.converged.all()


def test_a_mode_solve_refuses_a_start_where_the_density_is_not_finite():
    view = ModelView(hier, hier_data(), unit_plate="groups")
    y = with_entry(view.init_y, (1, 0), math.inf)
    with pytest.raises(ValueError, match="the mode solve cannot start: y holds non-finite coordinates"):
        solve_modes(view, view.init_theta, y)
    theta = with_entry(view.init_theta, 1, 800.0)  # tau = exp(800) = inf
    with pytest.raises(ValueError, match=r"cannot start: .* sites responsible: 'tau' \(-inf\), 'u' \(-inf\)"):
        solve_modes(view, theta, view.init_y)


def test_an_iteration_cap_too_small_is_warned_about_naming_the_units():
    counts = torch.tensor([0.0, 3.0, 1.0, 2.0, 7.0])
    with pytest.warns(ModeConvergenceWarning, match=r"5 of 5 units did not reach .* 1 Newton iterations"):
        trace = traced(LaplaceMarginal(count_model("Poisson"), unit_plate="groups", max_iter=1), counts)
    assert math.isfinite(trace.log_prob_sum())
    with pytest.warns(
        ModeConvergenceWarning, match="joint mode of the units' latents was not reached in 1 Newton"
    ):
        trace = traced(LaplaceMarginal(crossed, unit_plate=("a", "b"), max_iter=1), *crossed_data())
    assert math.isfinite(trace.log_prob_sum())


# ---------------------------------------------------------------------------
# a log density whose Hessian is indefinite everywhere


def convex(obs):
    """Each unit's log density is +(u - mu)²/2: convex in u, no maximum."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", len(obs)):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.factor("bowl", (u - mu) ** 2)
        pyro.sample("z", dist.Normal(mu, 1.0), obs=obs)


def convex_mle(obs):
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("groups", len(obs)):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.factor("bowl", (u - mu) ** 2)
        pyro.sample("z", dist.Normal(mu, 1.0), obs=obs)


CONVEX = {
    "LaplaceGuide": lambda obs: LaplaceGuide(convex, unit_plate="groups")(obs),
    "AmortizedLaplaceGuide": lambda obs: AmortizedLaplaceGuide(convex, unit_plate="groups")(obs),
    "laplace_mle": lambda obs: laplace_mle(convex_mle, obs, unit_plate="groups"),
    "laplace_log_marginal": lambda obs: (lambda v: laplace_log_marginal(v, v.init_theta, v.init_y))(
        ModelView(convex, obs, unit_plate="groups")
    ),
}


@pytest.mark.parametrize("entry", CONVEX)
def test_units_whose_hessian_is_indefinite_everywhere_are_named(entry):
    match = r"the Hessian of 4 units is not negative definite .* \(units \[0, 1, 2, 3\]\): no Laplace"
    with pytest.raises(ValueError, match=match):
        CONVEX[entry](torch.zeros(4))


def test_an_indefinite_hessian_is_refused_unrepaired_and_repaired_on_request():
    view = ModelView(convex, torch.zeros(4), unit_plate="groups")
    H = structured_hessian(view, view.init_theta, view.init_y)
    assert (H.D > 0).all()  # the convex units
    with pytest.raises(
        ValueError, match=r"4 of 4 local blocks D\[i\] are not positive definite.*repair='softabs'"
    ):
        H.precision()
    dense = H.precision(repair="softabs").to_dense()
    assert torch.isfinite(dense).all() and torch.linalg.eigvalsh(dense).min() > 0
    torch.testing.assert_close(
        -dense_hessian(view, view.init_theta, view.init_y).diagonal()[1:], -H.D.flatten()
    )
    # the Newton solve runs away from the minimum: finite, and says it did not converge
    result = solve_modes(view, view.init_theta, view.init_y)
    assert torch.isfinite(result.y).all() and not result.converged.any()


def test_the_laplace_marginal_rejects_a_theta_without_a_laplace_approximation():
    # -inf (a rejected NUTS proposal or trial point), never NaN
    trace = traced(LaplaceMarginal(convex, unit_plate="groups"), torch.zeros(4))
    assert trace.log_prob_sum() == -math.inf


# ---------------------------------------------------------------------------
# an improper posterior: no mode for a Laplace guide to start from


def unbounded(obs):
    """log p = +mu²/2 + const: no mode, an improper posterior."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("bowl", mu**2)
    with pyro.plate("data", len(obs)):
        pyro.sample("z", dist.Normal(0.0, 1.0), obs=obs)


def test_a_laplace_guide_on_an_unbounded_density_warns_and_starts_where_it_was_told():
    guide = LaplaceGuide(unbounded)
    with pytest.warns(
        RuntimeWarning, match=r"no mode of the Laplace marginal was found .* is the posterior proper"
    ):
        guide(torch.zeros(3))
    # not at |mu| ~ 1e100, where L-BFGS runs off to, but at init_loc_fn's point (near the prior median)
    mu = guide.median(torch.zeros(3))["mu"]
    assert mu == guide.view.init_theta[0] and abs(mu) < 1.0


def crossed_no_mode(a_idx, b_idx, obs):
    """Crossed Bernoulli effects; factor a's units have a flat density, and
    unit a=0 sees only successes: no joint mode."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("a", 4):
        a = pyro.sample("ua", dist.Normal(0.0, 1.0))
        pyro.factor("flat", 0.5 * a**2)
    with pyro.plate("b", 3):
        b = pyro.sample("ub", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(obs)):
        pyro.sample("z", dist.Bernoulli(logits=mu + a[..., a_idx] + b[..., b_idx]), obs=obs)


def test_several_factors_without_a_joint_mode_warn_and_leak_no_nan():
    # L-BFGS's line search on this flat, inexact Laplace marginal collapses
    # its bracket and proposes θ = NaN (once a crash in the model, naming
    # nothing); the trial is rejected, and the guide starts at init_loc_fn's point
    a_idx, b_idx = torch.arange(12) % 4, torch.arange(12) % 3
    obs = torch.where(a_idx == 0, 1.0, (torch.arange(12) % 2).double())
    pyro.set_rng_seed(0)
    with (
        pytest.warns(RuntimeWarning, match="no mode of the Laplace marginal was found"),
        pytest.warns(ModeConvergenceWarning, match="joint mode of the units' latents was not reached"),
    ):
        values = LaplaceGuide(crossed_no_mode, unit_plate=("a", "b"))(a_idx, b_idx, obs)
    assert all_finite(values)


# ---------------------------------------------------------------------------
# maximum likelihood where the data do not identify the parameters


def test_laplace_mle_names_parameters_the_data_do_not_identify():
    def model(obs):
        a = pyro.param("a", torch.tensor(0.0))
        b = pyro.param("b", torch.tensor(0.0))  # only a + b enters
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(a + b + u, 1.0), obs=obs)

    with pytest.warns(
        RuntimeWarning, match=r"not negative definite to working precision \(curvature .* along a, b\)"
    ):
        fit = laplace_mle(model, hier_data(), unit_plate="groups", max_eval=15)
    assert math.isfinite(fit.log_likelihood)
    assert math.isnan(fit.std_errors["a"]) and math.isnan(fit.std_errors["b"])
    torch.testing.assert_close(fit.params["a"] + fit.params["b"], hier_data().mean(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# an interrupted fit, and a step that fails

POISON = {"interrupt": False, "inf": False}


@pytest.fixture(autouse=True)
def _no_poison():
    POISON.update(interrupt=False, inf=False)
    yield
    POISON.update(interrupt=False, inf=False)


def poisonable(obs):
    """``hier``, which raises KeyboardInterrupt or adds an infinite factor on demand."""
    if POISON["interrupt"]:
        raise KeyboardInterrupt
    if POISON["inf"]:
        pyro.factor("poison", torch.tensor(math.inf))
    hier(obs)


def laplace_adam():
    guide = LaplaceGuide(poisonable, unit_plate="groups", init_to_mode=False)
    return guide, {"optim": pyro.optim.Adam({"lr": 0.05})}


def amortized_newton():
    guide = AmortizedLaplaceGuide(poisonable, unit_plate="groups", init_to_mode=False)
    return guide, {"optim": LaplaceNewton(num_particles=4, blocks=2)}


def natural_gradient():
    optim = NaturalGradient(lr=0.5, num_samples=4)
    return AutoMultivariateNormal(poisonable), {"optim": optim, "loss": optim.loss}


FITS = {  # (set-up, steps, the step after which to interrupt)
    "LaplaceGuide + Adam": (laplace_adam, 6, 3),
    "AmortizedLaplaceGuide + LaplaceNewton": (amortized_newton, 6, 2),
    "AutoMultivariateNormal + NaturalGradient": (natural_gradient, 6, 3),
}
_REFERENCE = {}


def fresh_fit(name, seed=0, **options):
    """A fit as in a new process (empty param store, new guide and optimiser)."""
    make, steps, _ = FITS[name]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide, defaults = make()
    options = {"steps": steps, "window": 2, "tol": None, "progress": False, **defaults, **options}
    return curvi.fit(poisonable, guide, hier_data(), **options)


def param_store():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def reference(name):
    if name not in _REFERENCE:
        result = fresh_fit(name)
        _REFERENCE[name] = result.elbo, param_store()
    return _REFERENCE[name]


@pytest.mark.parametrize("where", ["callback", "inside a step"])
@pytest.mark.parametrize("name", FITS)
def test_an_interrupted_fit_leaves_a_complete_checkpoint_and_resumes_exactly(name, where, tmp_path):
    elbo, final = reference(name)
    at = FITS[name][2]
    path = tmp_path / "fit.pt"

    def interrupt(step, value):
        if where == "callback" and step == at:
            raise KeyboardInterrupt
        POISON["interrupt"] = step == at  # the next step's model raises

    with pytest.raises(KeyboardInterrupt):
        fresh_fit(name, checkpoint=path, checkpoint_every=2, callback=interrupt)
    POISON["interrupt"] = False
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == at and saved["elbo"] == elbo[:at]  # the last completed step
    assert_same(param_store(), saved["param_store"]["params"])  # nothing half-updated

    resumed = fresh_fit(name, seed=123, checkpoint=path)
    assert resumed.elbo == elbo and f"resumed from {path} at step {at}" in resumed.message
    assert_same(param_store(), final)


@pytest.mark.filterwarnings("ignore:Encountered \\+inf")
@pytest.mark.parametrize("name", FITS)
def test_a_step_whose_loss_turns_non_finite_leaves_the_param_store_untouched(name):
    at = FITS[name][2]
    before = {}

    def poison_next(step, value):
        if step == at:
            before.update(param_store())
            POISON["inf"] = True

    # the Laplace guides evaluate the model's density themselves and name the
    # site; Pyro's ELBO reports the non-finite loss and the step
    with pytest.raises(ValueError, match=rf"'poison' \(inf\)|non-finite loss -inf at step {at + 1}"):
        fresh_fit(name, callback=poison_next)
    assert_same(param_store(), before)
