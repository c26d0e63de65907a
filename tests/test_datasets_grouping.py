"""The data sets with several grouping factors (lme4's Penicillin, Pastes,
grouseticks and InstEval) load as documented, and their reference fits
(benchmarks/reference/grouping_factors.R) agree with the bundled data where
that can be checked in closed form. No R needed."""

import csv
from importlib import resources

import pytest
import torch

from curvi.datasets import (
    GROUSETICKS_GLMMTMB,
    INSTEVAL_GLMMTMB,
    PASTES_GLMMTMB,
    PENICILLIN_GLMMTMB,
    load_grouseticks,
    load_insteval,
    load_pastes,
    load_penicillin,
)


def assert_codes(codes, num_levels):
    """0-based, contiguous integer codes of a factor with num_levels levels."""
    assert codes.dtype == torch.int64
    assert torch.equal(codes.unique(), torch.arange(num_levels))


def gaussian_log_likelihood(y, design, beta, factors, sds, residual_sd):
    """Exact log likelihood of y ~ N(design @ beta, sum_k sd_k^2 Z_k Z_k^T +
    residual_sd^2 I), Z_k the indicator matrix of factor k (dense)."""
    cov = residual_sd**2 * torch.eye(len(y), dtype=y.dtype)
    for codes, sd in zip(factors, sds):
        z = torch.nn.functional.one_hot(codes).to(y.dtype)
        cov = cov + sd**2 * z @ z.T
    mean = design @ torch.tensor(beta, dtype=y.dtype)
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(y)


def check_gaussian_reference(data, y, names, ref):
    """The reference logLik is the exact likelihood of the bundled data at the
    reference parameters, the intercept is the GLS estimate there, and moving
    any variance parameter lowers the likelihood (a maximum)."""
    factors = [getattr(data, name) for name in names]
    sds = [ref["sds"][name] for name in names]
    args = (y, data.design, ref["fixed_effects"], factors)
    log_lik = gaussian_log_likelihood(*args, sds, ref["residual_sd"])
    assert abs(float(log_lik) - ref["log_likelihood"]) < 1e-7
    for i in range(len(sds) + 1):
        for factor in (0.99, 1.01):
            moved = [sd * (factor if j == i else 1.0) for j, sd in enumerate(sds)]
            residual = ref["residual_sd"] * (factor if i == len(sds) else 1.0)
            assert gaussian_log_likelihood(*args, moved, residual) < log_lik


def test_penicillin():
    data = load_penicillin(dtype=torch.float64)
    assert data.diameter.shape == (144,) and data.design.shape == (144, 1)
    assert (data.num_plates, data.num_samples) == (24, 6)
    assert_codes(data.plate, 24)
    assert_codes(data.sample, 6)
    pairs = data.plate * 6 + data.sample  # fully crossed: each pair once
    assert torch.equal(pairs.sort().values, torch.arange(144))
    assert abs(float(data.diameter.mean()) - 22.97222222) < 1e-8  # R: mean(diameter)
    # Balanced: the ML intercept is the mean.
    assert abs(PENICILLIN_GLMMTMB["fixed_effects"][0] - float(data.diameter.mean())) < 1e-8
    check_gaussian_reference(data, data.diameter, ("plate", "sample"), PENICILLIN_GLMMTMB)


def test_pastes():
    data = load_pastes(dtype=torch.float64)
    assert data.strength.shape == (60,) and data.design.shape == (60, 1)
    assert (data.num_batches, data.num_samples) == (10, 30)
    assert_codes(data.batch, 10)
    assert_codes(data.cask, 3)
    assert_codes(data.sample, 30)
    assert torch.equal(data.sample, data.batch * 3 + data.cask)  # batch:cask, nested
    assert torch.equal(data.sample.bincount(), torch.full((30,), 2))
    assert abs(float(data.strength.mean()) - 60.05333333) < 1e-8  # R: mean(strength)
    assert abs(PASTES_GLMMTMB["fixed_effects"][0] - float(data.strength.mean())) < 1e-8
    check_gaussian_reference(data, data.strength, ("batch", "sample"), PASTES_GLMMTMB)


def test_grouseticks():
    data = load_grouseticks(dtype=torch.float64)
    assert data.ticks.shape == (403,) and data.design.shape == (403, 4)
    assert (data.num_broods, data.num_locations) == (118, 63)
    assert_codes(data.brood, 118)
    assert_codes(data.location, 63)
    assert torch.equal(data.index, torch.arange(403))  # one level per row
    assert_codes(data.year, 3)
    assert data.year.bincount().tolist() == [117, 155, 131]  # R: table(YEAR)
    assert int(data.ticks.sum()) == 2567
    assert abs(float(data.ticks.mean()) - 6.369727047) < 1e-9  # R: mean(TICKS)
    assert abs(float(data.height.mean()) - 462.2406948) < 1e-7  # R: mean(HEIGHT)
    # Columns (Intercept), YEAR96, YEAR97, cHEIGHT, as R's model.matrix.
    assert torch.equal(data.design[:, 0], torch.ones(403, dtype=torch.float64))
    assert torch.equal(data.design[:, 1], (data.year == 1).double())
    assert torch.equal(data.design[:, 2], (data.year == 2).double())
    assert abs(float(data.design[:, 3].sum())) < 1e-9
    with resources.files("curvi.datasets").joinpath("grouseticks.csv").open() as f:
        r_cheight = torch.tensor([float(r["cHEIGHT"]) for r in csv.DictReader(f)], dtype=torch.float64)
    assert torch.allclose(data.design[:, 3], r_cheight, rtol=0, atol=1e-12)
    assert len(GROUSETICKS_GLMMTMB["fixed_effects"]) == 4
    assert set(GROUSETICKS_GLMMTMB["sds"]) == {"brood", "index", "location"}


def test_insteval():
    data = load_insteval(dtype=torch.float64)
    assert data.y.shape == (73421,) and data.design.shape == (73421, 1)
    assert (data.num_students, data.num_lecturers) == (2972, 1128)
    assert_codes(data.s, 2972)
    assert_codes(data.d, 1128)
    assert int(data.y.sum()) == 235369
    assert abs(float(data.y.mean()) - 3.20574495) < 1e-8  # R: mean(y)
    assert data.y.long().bincount().tolist() == [0, 10186, 12951, 17609, 16921, 15754]
    assert set(INSTEVAL_GLMMTMB["sds"]) == {"s", "d"}


@pytest.mark.parametrize("loader", [load_penicillin, load_pastes, load_grouseticks, load_insteval])
def test_default_dtype(loader):
    data = loader()
    for value in data:
        if value.is_floating_point():
            assert value.dtype == torch.get_default_dtype()
