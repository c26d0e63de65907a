"""curvi.glmm against glmmTMB on bundled real data, and its read-outs.

The reference fits are glmmTMB 1.1.5's (``benchmarks/reference/glmm.R``,
stored in ``curvi/datasets/glmm_reference.json``): each case's formula in
formulae's syntax is fitted by ``GLMM.fit("ml")`` and compared with the
logLik, fixed effects, standard errors, variance components, residual sd
and dispersion glmmTMB reports.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

import curvi
from curvi.datasets import CBPP_NUTS, glmm_references, load_frame

REFERENCES = {ref["name"]: ref for ref in glmm_references()}


def _frame(ref):
    return load_frame(ref["dataset"].removesuffix(".csv"))


@pytest.fixture(scope="module")
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


class _Fits(dict):
    """ML fits of the reference cases, each made when first asked for."""

    def __missing__(self, name):
        ref = REFERENCES[name]
        model = curvi.glmm(ref["formula"], _frame(ref), family=ref["family"], weights=ref["weights"])
        self[name] = model.fit("ml", num_draws=200)
        return self[name]


@pytest.fixture(scope="module")
def ml_fits(float64):
    return _Fits()


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_ml_fit_equals_glmmtmb(ml_fits, name):
    ref, fit = REFERENCES[name], ml_fits[name]
    assert fit.converged
    assert fit.log_likelihood == pytest.approx(ref["logLik"], abs=1e-6)
    assert fit.num_params == ref["df"]
    assert fit.aic == pytest.approx(ref["AIC"], abs=1e-5)
    assert fit.bic == pytest.approx(ref["BIC"], abs=1e-5)
    estimates = list(fit.fixed_effects.values())
    errors = list(fit.std_errors.values())
    assert len(estimates) == len(ref["fixed_effects"])
    for (r_name, value, se), estimate, error in zip(ref["fixed_effects"], estimates, errors):
        assert estimate == pytest.approx(value, abs=2e-5 * max(1, abs(value))), r_name
        assert error == pytest.approx(se, rel=2e-4), r_name
    components = fit.variance_components
    assert [c["factor"] for c in components] == [r["group"] for r in ref["random"]]
    for component, r in zip(components, ref["random"]):
        assert component["sd"].tolist() == pytest.approx(list(r["sd"].values()), rel=1e-4, abs=1e-6)
        if r["cor"] is not None:
            assert np.allclose(component["cor"].numpy(), np.array(r["cor"]), atol=1e-4)
    if ref["sigma"] is not None:
        assert fit.point["sigma"].item() == pytest.approx(ref["sigma"], rel=1e-5)
    if ref["dispersion"] is not None:
        assert fit.point["phi"].item() == pytest.approx(ref["dispersion"], rel=1e-4)


def test_lme4_and_bambi_binomial_responses_agree(float64):
    cbpp = load_frame("cbpp")
    lme4 = curvi.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family="binomial")
    bambi = curvi.glmm("p(incidence, size) ~ period + (1 | herd)", cbpp, family="binomial")
    assert torch.equal(lme4.design.response, bambi.design.response)
    assert torch.equal(lme4.design.trials, bambi.design.trials)
    assert lme4.fixed_names == bambi.fixed_names == ("Intercept", "period[2]", "period[3]", "period[4]")


def test_a_binary_binomial_response_is_bernoulli(float64):
    model = curvi.glmm("use ~ age + urban + (1 | district)", load_frame("contraception"), family="binomial")
    assert model.family == "bernoulli"


def test_blocks_sites_and_correlations(float64):
    sleep = load_frame("sleepstudy")
    correlated = curvi.glmm("Reaction ~ Days + (Days | Subject)", sleep)
    assert correlated.block_sites(0) == {"sd": "sd_Subject", "r": "r_Subject", "L": "L_Subject"}
    diagonal = curvi.glmm("Reaction ~ Days + (Days || Subject)", sleep)  # (1 | S) + (0 + Days | S)
    assert [diagonal.block_sites(i) for i in range(2)] == [
        {"sd": "sd_Subject", "r": "r_Subject"},
        {"sd": "sd_Subject_2", "r": "r_Subject_2"},
    ]
    assert [b.columns for b in diagonal.design.blocks] == [("Intercept",), ("Days",)]
    two = curvi.glmm("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleep)
    assert [two.block_sites(i)["r"] for i in range(2)] == ["r_Subject", "r_Subject_2"]
    nested = curvi.glmm("strength ~ 1 + (1 | batch/cask)", load_frame("pastes"))
    assert nested.unit_plate == ("batch", "batch:cask")
    assert len(nested.design.factors["batch:cask"].levels) == 30


def test_the_model_is_an_editable_pyro_model(float64):
    model = curvi.glmm("p(incidence, size) ~ period + (1 | herd)", load_frame("cbpp"), family="binomial")
    trace = pyro.poutine.trace(model.model).get_trace(model.response)
    assert {"beta", "sd_herd", "r_herd", "y"} <= set(trace.nodes)
    assert trace.nodes["r_herd"]["value"].shape == (15, 1)
    assert torch.equal(trace.nodes["y"]["value"], model.response)


def test_predict_by_hand(ml_fits):
    fit = ml_fits["cbpp_binomial"]
    cbpp = load_frame("cbpp")
    beta = torch.tensor(list(fit.fixed_effects.values()))
    modes = fit.random_effects["herd"]["Intercept"]
    x = fit.glmm.design.fixed
    eta = x @ beta + torch.tensor([modes[h] for h in cbpp["herd"]])
    assert torch.allclose(fit.predict(type="link"), eta)
    assert torch.allclose(fit.predict(), torch.sigmoid(eta))
    population = fit.predict(random_effects=False, type="link")
    assert torch.allclose(population, x @ beta)
    new = cbpp.head(3).assign(herd=["1", "no such herd", "2"])
    with pytest.warns(UserWarning, match=r"levels of 'herd' not seen in the fit \(\['no such herd'\]\)"):
        predicted = fit.predict(new, type="link")
    assert predicted[1] == pytest.approx((x[1] @ beta).item())
    assert predicted[0] == pytest.approx(eta[0].item())


def test_predict_with_an_offset_uses_newdata_offset(ml_fits):
    fit = ml_fits["cbpp_poisson_offset"]
    cbpp = load_frame("cbpp").head(4)
    doubled = cbpp.assign(size=2 * cbpp["size"])
    assert torch.allclose(fit.predict(doubled), 2 * fit.predict(cbpp))


def test_to_arviz_summary_and_loo(ml_fits):
    import arviz as az

    fit = ml_fits["sleepstudy_correlated"]
    idata = fit.to_arviz()
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(idata.groups())
    assert list(idata.posterior["beta"].coords["fixed_effect"].values) == ["Intercept", "Days"]
    assert list(idata.posterior["r_Subject"].coords["Subject"].values)[:2] == ["308", "309"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, var_names=["beta", "sd_Subject", "sigma"], kind="stats")
        loo = az.loo(idata)
    assert summary.loc["beta[Intercept]", "mean"] == pytest.approx(
        fit.draws["beta"][:, 0].mean().item(), abs=1e-3
    )
    assert summary.loc["sigma", "mean"] == pytest.approx(fit.draws["sigma"].mean().item(), abs=1e-3)
    assert math.isfinite(loo.elpd_loo)


def test_ml_draws_are_the_wald_and_conditional_distributions(ml_fits):
    fit = ml_fits["cbpp_binomial"]
    beta = fit.draws["beta"]
    se = torch.tensor(list(fit.std_errors.values()))
    assert (beta.std(0) / se - 1).abs().max() < 0.25  # 200 draws
    modes = torch.tensor(fit.random_effects["herd"]["Intercept"].to_numpy())
    assert (fit.draws["r_herd"][..., 0].mean(0) - modes).abs().max() < 0.2


def test_summary_reads_like_glmmtmb(ml_fits):
    text = ml_fits["sleepstudy_correlated"].summary()
    for piece in (
        "Family: gaussian",
        "logLik",
        "Random effects:",
        "Subject",
        "Residual",
        "Conditional model:",
    ):
        assert piece in text


def test_summary_reports_the_dispersion(ml_fits):
    assert "Dispersion parameter for nbinom2" in ml_fits["grouseticks_nbinom2"].summary()


@pytest.fixture(scope="module")
def guide_fit(float64):
    import pyro.distributions as dist

    cbpp = load_frame("cbpp")
    # the demo's priors, so the NUTS reference of curvi.demo applies
    priors = {
        "beta": dist.Normal(torch.zeros(4), 2.5).to_event(1),
        "sd_herd": dist.HalfNormal(torch.ones(1)).to_event(1),
    }
    model = curvi.glmm("p(incidence, size) ~ period + (1 | herd)", cbpp, family="binomial", priors=priors)
    return model.fit("guide", num_draws=2000)


def test_guide_fit_matches_nuts_on_cbpp(guide_fit):
    means = torch.tensor(list(guide_fit.fixed_effects.values()))
    nuts_mean, nuts_sd = (
        torch.tensor(CBPP_NUTS["fixed_effects_mean"]),
        torch.tensor(CBPP_NUTS["fixed_effects_sd"]),
    )
    assert ((means - nuts_mean) / nuts_sd).abs().max() < 0.2
    sds = guide_fit.draws["beta"].std(0)
    assert ((sds / nuts_sd) - 1).abs().max() < 0.15
    text = guide_fit.summary()
    assert "Regression Coefficients:" in text and "sd(Intercept)" in text


def test_nuts_fit_reads_out(float64):
    model = curvi.glmm("strength ~ 1 + (1 | batch)", load_frame("pastes"))
    fit = model.fit("nuts", num_samples=6, warmup_steps=6)  # read-outs only: a short chain
    assert fit.draws["r_batch"].shape == (6, 10, 1)
    assert fit.draws["beta"].shape == (6, 1)
    text = fit.summary()
    assert "Rhat" in text and "~batch (Number of levels: 10)" in text


def test_plots_render(guide_fit, ml_fits, tmp_path):
    reference = {
        name: torch.distributions.Normal(m, s).sample((2000,))
        for name, m, s in zip(
            guide_fit.glmm.fixed_names, CBPP_NUTS["fixed_effects_mean"], CBPP_NUTS["fixed_effects_sd"]
        )
    }
    outputs = {
        "elbo": guide_fit.plot_elbo(out=tmp_path / "elbo.png"),
        "marginals": guide_fit.plot_marginals(reference, out=tmp_path / "marginals.png"),
        "spectrum": ml_fits["sleepstudy_correlated"].plot_spectrum(out=tmp_path / "spectrum.png"),
        "caterpillar": guide_fit.plot_caterpillar("herd", out=tmp_path / "caterpillar.png"),
    }
    for name in outputs:
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


# ---- bad input ------------------------------------------------------------------
def test_a_missing_column_is_named(float64):
    with pytest.raises(ValueError, match="no column 'periode'"):
        curvi.glmm("p(incidence, size) ~ periode + (1 | herd)", load_frame("cbpp"), family="binomial")
    with pytest.raises(ValueError, match="no column 'herds'"):
        curvi.glmm("p(incidence, size) ~ period + (1 | herds)", load_frame("cbpp"), family="binomial")


def test_a_grouping_factor_with_one_level_is_refused(float64):
    frame = load_frame("cbpp").assign(farm="only")
    with pytest.raises(ValueError, match="grouping factor 'farm' has 1 level"):
        curvi.glmm("p(incidence, size) ~ period + (1 | farm)", frame, family="binomial")


def test_missing_values_are_dropped_by_name_and_infinite_ones_refused(float64):
    frame = load_frame("sleepstudy")
    frame.loc[3, "Days"] = np.nan
    with pytest.warns(UserWarning, match=r"dropped 1 of 180 rows with missing values in \['Days'\]"):
        model = curvi.glmm("Reaction ~ Days + (1 | Subject)", frame)
    assert model.design.num_observations == 179
    frame.loc[3, "Days"] = np.inf
    with pytest.raises(ValueError, match="'Days' has infinite"):
        curvi.glmm("Reaction ~ Days + (1 | Subject)", frame)
    frame.loc[3, "Days"], frame.loc[5, "Reaction"] = 1.0, -np.inf
    with pytest.raises(ValueError, match="response 'Reaction' has infinite"):
        curvi.glmm("Reaction ~ Days + (1 | Subject)", frame)


@pytest.mark.parametrize("bad", [-1, 2.5])
@pytest.mark.parametrize("family", ["poisson", "negativebinomial"])
def test_count_families_refuse_negative_or_fractional_counts(float64, family, bad):
    frame = load_frame("grouseticks").astype({"TICKS": float})
    frame.loc[0, "TICKS"] = bad
    with pytest.raises(ValueError, match=f"response 'TICKS' must hold non-negative whole numbers.*{bad:g}"):
        curvi.glmm("TICKS ~ YEAR + (1 | LOCATION)", frame, family=family)


def test_binomial_responses_out_of_range_are_refused(float64):
    frame = load_frame("cbpp")
    frame.loc[0, "incidence"] = 99
    with pytest.raises(ValueError, match="'successes' cannot be greater than 'trials'"):
        curvi.glmm("p(incidence, size) ~ period + (1 | herd)", frame, family="binomial")
    with pytest.raises(ValueError, match="must be 0/1 for family 'binomial'"):
        curvi.glmm("incidence ~ period + (1 | herd)", load_frame("cbpp"), family="binomial")


def test_options_are_checked_by_name(float64):
    cbpp = load_frame("cbpp")
    formula = "p(incidence, size) ~ period + (1 | herd)"
    with pytest.raises(ValueError, match="unknown family 'binomal'"):
        curvi.glmm(formula, cbpp, family="binomal")
    with pytest.raises(ValueError, match=r"priors name \['sd_farm'\].*global sites are"):
        curvi.glmm(formula, cbpp, family="binomial", priors={"sd_farm": None})
    model = curvi.glmm(formula, cbpp, family="binomial")
    with pytest.raises(ValueError, match="method must be one of"):
        model.fit("mcmc")
    with pytest.raises(ValueError, match="has no random effects"):
        curvi.glmm("p(incidence, size) ~ period", cbpp, family="binomial").fit()
    with pytest.raises(ValueError, match="weights has 3 values for 56 rows"):
        curvi.glmm(formula, cbpp, family="binomial", weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="appears in two terms"):
        curvi.glmm("p(incidence, size) ~ period + (1 | herd) + (1 | herd)", cbpp, family="binomial")
    with pytest.raises(ValueError, match="unbalanced"):
        curvi.glmm("p(incidence, size) ~ period + (1 | herd", cbpp, family="binomial")


def test_gaussian_levels_as_many_as_rows_are_refused(float64):
    frame = pd.DataFrame({"y": np.arange(6.0), "g": list("abcdef")})
    with pytest.raises(ValueError, match="'g' has 6 levels for 6 rows"):
        curvi.glmm("y ~ 1 + (1 | g)", frame)


def test_an_unknown_level_in_newdata_gives_the_population_prediction(ml_fits):
    fit = ml_fits["pastes_nested"]
    new = load_frame("pastes").head(2).assign(batch=["Z", "Z"])
    population = fit.predict(random_effects=False)[:2]
    with pytest.warns(UserWarning, match="levels of 'batch' not seen"):
        assert torch.allclose(fit.predict(new), population)
    with pytest.raises(ValueError, match="newdata has no column 'cask'"):
        fit.predict(new.drop(columns=["cask"]))


def test_ml_with_quadrature_reproduces_glmer_nagq(float64):
    # glmer(..., nAGQ = 5) on cbpp; see tests/test_quadrature.py for the R
    # command and the saturated-model constant glmer leaves out
    from test_quadrature import GLMER_AGQ, saturated_log_likelihood

    cbpp = load_frame("cbpp")
    model = curvi.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family="binomial")
    fit = model.fit("ml", quadrature=5)
    log_lik, beta, sigma = GLMER_AGQ[5]
    expected = log_lik + saturated_log_likelihood(model.design.trials, model.response)
    assert fit.log_likelihood == pytest.approx(expected, abs=1e-5)
    assert list(fit.fixed_effects.values()) == pytest.approx(beta, abs=2e-5)
    assert fit.variance_components[0]["sd"].item() == pytest.approx(sigma, abs=2e-5)
    assert "adaptive Gauss-Hermite (5 nodes)" in fit.summary()


def test_formulas_without_fixed_effects_and_with_factor_responses(float64):
    pastes = load_frame("pastes")
    fit = curvi.glmm("strength ~ 0 + (1 | batch)", pastes).fit("ml")
    assert fit.glmm.fixed_names == () and fit.fixed_effects == {}
    assert torch.allclose(fit.predict(pastes.head(3)), fit.predict()[:3])
    frame = load_frame("contraception")
    frame["used"] = np.where(frame["use"] == 1, "Y", "N")
    model = curvi.glmm("used[Y] ~ age * urban + (1 | district)", frame, family="bernoulli")
    assert torch.equal(model.response, torch.tensor(frame["use"].to_numpy(), dtype=torch.float64))
    assert model.fixed_names == ("Intercept", "age", "urban[Y]", "age:urban[Y]")


def test_ml_draws_refuse_a_covariance_that_is_not_positive_definite(ml_fits):
    fit = ml_fits["cbpp_binomial"]
    broken = curvi.MaximumLikelihoodFit(fit.glmm, fit.laplace)
    original = fit.laplace.covariance
    try:
        fit.laplace.covariance = torch.full_like(original, float("nan"))
        with pytest.raises(ValueError, match=r"covariance of \['beta', 'sd_herd'\] is not positive definite"):
            _ = broken.draws
    finally:
        fit.laplace.covariance = original
