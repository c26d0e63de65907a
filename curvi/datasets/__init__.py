"""Small real data sets bundled with curvi (see README.md in this folder for
sources and licences). Loaders return tensors in the default dtype."""

from __future__ import annotations

import csv
from importlib import resources
from typing import NamedTuple

import torch

#: glmmTMB 1.1.5's Laplace fit of ``incidence/size ~ period + (1 | herd)``
#: (binomial): fixed effects in R's treatment coding, herd sd, logLik with
#: the log binomial coefficients included.
CBPP_GLMMTMB = {
    "fixed_effects": (-1.398532, -0.992332, -1.128671, -1.580314),
    "herd_sd": 0.642262,
    "log_likelihood": -92.026282,
    "log_binomial_coefficients": 185.475660,
}


#: Posterior of :func:`curvi.demo.cbpp_model` (same priors) from Pyro's NUTS:
#: one chain, 1 500 warm-up + 8 000 draws, R-hat 1.00, no divergences, ESS
#: ≥ 2 397; regenerate with ``python benchmarks/cbpp_nuts.py``. Means and sds
#: of the four fixed effects and of the herd sd.
CBPP_NUTS = {
    "fixed_effects_mean": (-1.4159, -0.9864, -1.1231, -1.5789),
    "fixed_effects_sd": (0.2590, 0.3069, 0.3311, 0.4235),
    "herd_sd_mean": 0.7294,
    "herd_sd_sd": 0.2027,
}


class CBPP(NamedTuple):
    """The cbpp data: ``herd`` (0-based, 15 herds), ``period`` (0-based, 4
    periods), ``size`` and ``incidence`` per row; ``design`` is the fixed
    effects design matrix of ``~ period`` in R's treatment coding
    (intercept, period2, period3, period4)."""

    herd: torch.Tensor
    period: torch.Tensor
    size: torch.Tensor
    incidence: torch.Tensor
    design: torch.Tensor

    @property
    def num_herds(self) -> int:
        return int(self.herd.max()) + 1


def load_cbpp(dtype=None) -> CBPP:
    """Load lme4's cbpp data (56 rows).

    Usage::

        data = load_cbpp()
        data.design.shape, data.num_herds  # (56, 4), 15
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    with resources.files(__package__).joinpath("cbpp.csv").open() as f:
        rows = list(csv.DictReader(f))
    herd = torch.tensor([int(r["herd"]) - 1 for r in rows])
    period = torch.tensor([int(r["period"]) - 1 for r in rows])
    size = torch.tensor([float(r["size"]) for r in rows], dtype=dtype)
    incidence = torch.tensor([float(r["incidence"]) for r in rows], dtype=dtype)
    design = torch.nn.functional.one_hot(period, 4).to(dtype)
    design[:, 0] = 1.0  # intercept; columns 1-3 are period2..period4
    return CBPP(herd, period, size, incidence, design)


#: R's ``glm(type ~ ., family = binomial)`` on :func:`load_pima` (R 4.2.2),
#: with the seven covariates standardised (``scale()``: mean 0, sd 1, the
#: sample sd with n − 1) as :func:`load_pima` returns them: coefficients
#: (intercept first, then the columns of ``PIMA_COVARIATES``), standard
#: errors, and the log likelihood.
PIMA_GLM = {
    "coefficients": (
        -0.99003276398,
        0.40577930207,
        1.09492617364,
        -0.09472786190,
        0.07129316047,
        0.56891761120,
        0.45091053832,
        0.28383415067,
    ),
    "std_errors": (
        0.1227632578,
        0.1448774678,
        0.1315706870,
        0.1269627356,
        0.1553266619,
        0.1605670167,
        0.1254287083,
        0.1506644677,
    ),
    "log_likelihood": -233.1611339,
}

PIMA_COVARIATES = ("npreg", "glu", "bp", "skin", "bmi", "ped", "age")


class Pima(NamedTuple):
    """The Pima diabetes data: ``X`` the seven covariates of
    ``PIMA_COVARIATES`` standardised (mean 0, sd 1), ``raw`` the same
    unstandardised, ``y`` 1 for a diabetes diagnosis."""

    X: torch.Tensor
    raw: torch.Tensor
    y: torch.Tensor


def load_pima(dtype=None) -> Pima:
    """Load the Pima Indians diabetes data of R's MASS (``Pima.tr`` and
    ``Pima.te``: 532 women, 7 covariates, a binary outcome), a standard
    logistic-regression benchmark.

    Usage::

        data = load_pima()
        data.X.shape, float(data.y.mean())  # (532, 7), 0.33
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    with resources.files(__package__).joinpath("pima.csv").open() as f:
        rows = list(csv.DictReader(f))
    raw = torch.tensor([[float(r[c]) for c in PIMA_COVARIATES] for r in rows], dtype=dtype)
    y = torch.tensor([float(r["type"]) for r in rows], dtype=dtype)
    X = (raw - raw.mean(0)) / raw.std(0)
    return Pima(X, raw, y)
