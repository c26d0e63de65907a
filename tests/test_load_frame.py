"""load_frame reads the bundled CSVs as R does (factor columns as strings,
the rest as numbers), and glmm_references (glmm_reference.json, made by
benchmarks/reference/glmm.R) points at data that load_frame provides and
agrees with it where that can be checked without R."""

import math

import numpy as np
import pytest

from curvi.datasets import glmm_references, load_cbpp, load_frame


def test_cbpp_factors_are_strings_and_counts_numbers():
    frame = load_frame("cbpp")
    assert list(frame.columns) == ["herd", "incidence", "size", "period"]
    assert frame.shape == (56, 4)
    assert sorted(set(frame["herd"]), key=int) == [str(i) for i in range(1, 16)]
    assert sorted(set(frame["period"])) == ["1", "2", "3", "4"]
    assert all(isinstance(v, str) for v in frame["herd"])
    assert frame["incidence"].dtype.kind == "i" and frame["size"].dtype.kind == "i"
    # the same rows as the tensor loader
    data = load_cbpp()
    np.testing.assert_array_equal(frame["herd"].astype(int).to_numpy() - 1, data.herd.numpy())
    np.testing.assert_array_equal(frame["incidence"].to_numpy(), data.incidence.numpy())


@pytest.mark.parametrize(
    "name, shape, factors",
    [
        ("sleepstudy", (180, 4), ["Subject"]),
        ("contraception.csv", (1934, 6), ["woman", "district", "livch", "urban"]),
        ("grouseticks", (403, 7), ["INDEX", "BROOD", "YEAR", "LOCATION"]),
        ("pastes", (60, 4), ["batch", "cask", "sample"]),
        ("penicillin", (144, 3), ["plate", "sample"]),
        ("insteval.csv.gz", (73421, 3), ["s", "d"]),
    ],
)
def test_frames(name, shape, factors):
    frame = load_frame(name)
    assert frame.shape == shape
    for column in frame.columns:
        values = frame[column]
        if column in factors:
            assert all(isinstance(v, str) for v in values), column
        else:
            assert values.dtype.kind in "if", column


def test_documented_columns():
    sleep = load_frame("sleepstudy")
    assert sleep["w"].tolist() == [1 + i % 3 for i in range(180)]
    contra = load_frame("contraception")
    assert sorted(set(contra["use"])) == [0, 1] and int(contra["use"].sum()) == 759
    assert sorted(set(contra["livch"])) == ["0", "1", "2", "3+"]
    assert contra["district"].nunique() == 60
    assert sorted(set(load_frame("grouseticks")["YEAR"])) == ["95", "96", "97"]


def test_unknown_name_lists_the_data_sets():
    with pytest.raises(ValueError, match="no bundled data set 'nope'.*cbpp.*sleepstudy"):
        load_frame("nope")


def test_glmm_references_refer_to_bundled_columns():
    refs = glmm_references()
    assert len(refs) == 10
    assert len({r["name"] for r in refs}) == len(refs)
    for ref in refs:
        frame = load_frame(ref["dataset"])
        assert ref["nobs"] == len(frame)
        assert ref["family"] in {"gaussian", "binomial", "bernoulli", "poisson", "negativebinomial"}
        if ref["weights"] is not None:
            assert ref["weights"] in frame.columns
        for group in ref["random"]:
            for factor in group["group"].split(":"):
                assert factor in frame.columns
        assert (ref["sigma"] is not None) == (ref["family"] == "gaussian")
        assert (ref["dispersion"] is not None) == (ref["family"] == "negativebinomial")
        k = ref["df"]
        assert ref["AIC"] == pytest.approx(2 * k - 2 * ref["logLik"], rel=1e-13)
        assert ref["BIC"] == pytest.approx(k * math.log(ref["nobs"]) - 2 * ref["logLik"], rel=1e-13)
        assert all(se > 0 for _, _, se in ref["fixed_effects"])


def test_pastes_reference_matches_the_bundled_constant():
    """The nested Pastes fit was made twice (grouping_factors.R and glmm.R)."""
    from curvi.datasets import PASTES_GLMMTMB

    ref = next(r for r in glmm_references() if r["name"] == "pastes_nested")
    assert [g["group"] for g in ref["random"]] == ["batch", "batch:cask"]
    assert ref["logLik"] == pytest.approx(PASTES_GLMMTMB["log_likelihood"], abs=1e-9)
    assert ref["random"][0]["sd"]["(Intercept)"] == pytest.approx(PASTES_GLMMTMB["sds"]["batch"], abs=1e-8)
    assert ref["sigma"] == pytest.approx(PASTES_GLMMTMB["residual_sd"], abs=1e-8)


def _reference(name):
    return next(r for r in glmm_references() if r["name"] == name)


def test_sleepstudy_correlated_loglik_in_closed_form():
    """The Gaussian model's likelihood is exact: per subject, y ~ N(X beta,
    Z G Z' + sigma^2 I) with G from the recorded sds and correlation."""
    ref = _reference("sleepstudy_correlated")
    frame = load_frame(ref["dataset"])
    beta = np.array([estimate for _, estimate, _ in ref["fixed_effects"]])
    (term,) = ref["random"]
    sd = np.array([term["sd"]["(Intercept)"], term["sd"]["Days"]])
    cov = np.outer(sd, sd) * np.array(term["cor"])
    total = 0.0
    for _, rows in frame.groupby("Subject"):
        design = np.column_stack([np.ones(len(rows)), rows["Days"].to_numpy()])
        v = design @ cov @ design.T + ref["sigma"] ** 2 * np.eye(len(rows))
        r = rows["Reaction"].to_numpy() - design @ beta
        logdet = np.linalg.slogdet(v)[1]
        total -= 0.5 * (len(rows) * math.log(2 * math.pi) + logdet + r @ np.linalg.solve(v, r))
    assert total == pytest.approx(ref["logLik"], abs=1e-8)


def test_weighted_reference_multiplies_log_likelihood_terms_by_weights():
    """sleepstudy_weighted: sum_i w_i log N(y_i | x_i beta + b, sigma) + log
    N(b | 0, tau) integrated over each subject's intercept b (Gaussian in b)."""
    ref = _reference("sleepstudy_weighted")
    frame = load_frame(ref["dataset"])
    (_, b0, _), (_, b1, _) = ref["fixed_effects"]
    sigma, tau = ref["sigma"], ref["random"][0]["sd"]["(Intercept)"]
    total = 0.0
    for _, rows in frame.groupby("Subject"):
        w = rows[ref["weights"]].to_numpy(dtype=float)
        r = rows["Reaction"].to_numpy() - b0 - b1 * rows["Days"].to_numpy()
        a = w.sum() / sigma**2 + 1 / tau**2
        b = (w * r).sum() / sigma**2
        total += (
            -0.5 * w.sum() * math.log(2 * math.pi * sigma**2)
            - (w * r**2).sum() / (2 * sigma**2)
            - 0.5 * math.log(2 * math.pi * tau**2)
            + 0.5 * math.log(2 * math.pi / a)
            + b**2 / (2 * a)
        )
    assert total == pytest.approx(ref["logLik"], abs=1e-8)


def test_the_headerless_digits_file_reads_every_image():
    frame = load_frame("digits")
    assert frame.shape == (1797, 65) and frame.columns[-1] == "label"
    assert frame["label"].between(0, 9).all() and frame.iloc[:, :64].to_numpy().max() == 16
