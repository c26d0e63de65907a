"""Small real data sets bundled with curvi (see README.md in this folder for
sources and licences). Loaders return tensors in the default dtype;
:func:`load_frame` returns any of them as a pandas DataFrame, for formulas."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    import pandas

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


# --- Several grouping factors (crossed and nested) --------------------------
#
# Reference maximum-likelihood fits made by benchmarks/reference/
# grouping_factors.R with R 4.2.2, glmmTMB 1.1.5, TMB 1.9.2 and lme4 1.1.31
# (Debian 12 packages). glmmTMB was run with ``control = glmmTMBControl(
# optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-14))``; nlminb
# stops short of that tolerance ("singular convergence (7)"), so the numbers
# below are glmmTMB's optimum polished by Newton steps on glmmTMB's own
# objective (``fit$obj``) to a gradient below 1e-12 (they moved by at most
# 4e-6 from nlminb's point, the logLik by at most 1e-7). ``sds`` are the
# random-effect standard deviations keyed by the loader's field names;
# ``log_likelihood`` is the full ML log likelihood with all constants, as
# glmmTMB reports it (exact for the Gaussian models, Laplace for Poisson).


def _read_rows(name: str) -> list[dict[str, str]]:
    res = resources.files(__package__).joinpath(name)
    if name.endswith(".gz"):
        with res.open("rb") as raw, gzip.open(raw, "rt", newline="") as f:
            return list(csv.DictReader(f))
    with res.open(newline="") as f:
        return list(csv.DictReader(f))


def _codes(labels: list[str]) -> torch.Tensor:
    """0-based codes of factor labels in R's level order (integer labels
    sorted as numbers, other labels as strings, as R's factor() sorts them)."""
    numeric = all(label.isdigit() for label in labels)
    levels = sorted(set(labels), key=int if numeric else None)
    index = {label: i for i, label in enumerate(levels)}
    return torch.tensor([index[label] for label in labels])


#: ``glmmTMB(diameter ~ 1 + (1 | plate) + (1 | sample), data = Penicillin,
#: family = gaussian, REML = FALSE, control = <as above>)`` (R 4.2.2,
#: glmmTMB 1.1.5, TMB 1.9.2; polished). lme4 1.1.31's ``lmer(..., REML =
#: FALSE)`` agrees: logLik −166.094174334 (difference 7e-12), sds within
#: 1.2e-6. The intercept is the mean diameter (balanced design).
PENICILLIN_GLMMTMB = {
    "fixed_effects": (22.97222222,),
    "sds": {"plate": 0.8455721898, "sample": 1.770646279},
    "residual_sd": 0.5499321964,
    "log_likelihood": -166.094174334,
}


class Penicillin(NamedTuple):
    """The Penicillin data: ``plate`` (0-based, 24 plates ``a``..``x``) and
    ``sample`` (0-based, 6 penicillin samples ``A``..``F``) are crossed, one
    ``diameter`` (mm) per plate and sample; ``design`` is the intercept
    column of ``~ 1``."""

    plate: torch.Tensor
    sample: torch.Tensor
    diameter: torch.Tensor
    design: torch.Tensor

    @property
    def num_plates(self) -> int:
        return int(self.plate.max()) + 1

    @property
    def num_samples(self) -> int:
        return int(self.sample.max()) + 1


def load_penicillin(dtype=None) -> Penicillin:
    """Load lme4's Penicillin data (144 rows; crossed random effects).

    Usage::

        data = load_penicillin()
        data.design.shape, data.num_plates, data.num_samples  # (144, 1), 24, 6
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    rows = _read_rows("penicillin.csv")
    plate = _codes([r["plate"] for r in rows])
    sample = _codes([r["sample"] for r in rows])
    diameter = torch.tensor([float(r["diameter"]) for r in rows], dtype=dtype)
    return Penicillin(plate, sample, diameter, torch.ones(len(rows), 1, dtype=dtype))


#: ``glmmTMB(strength ~ 1 + (1 | batch / cask), data = Pastes, family =
#: gaussian, REML = FALSE, control = <as above>)`` (R 4.2.2, glmmTMB 1.1.5,
#: TMB 1.9.2; polished); ``(1 | batch / cask)`` is ``(1 | batch) +
#: (1 | batch:cask)``, and ``sample`` is the factor batch:cask. lme4 1.1.31's
#: ``lmer(..., REML = FALSE)``: logLik lower by 2.4e-10, sds within 1.1e-5
#: (the likelihood is flat there). The intercept is the mean strength.
PASTES_GLMMTMB = {
    "fixed_effects": (60.05333333,),
    "sds": {"batch": 1.095059613, "sample": 2.904077593},
    "residual_sd": 0.823407554,
    "log_likelihood": -123.997232931,
}


class Pastes(NamedTuple):
    """The Pastes data: ``batch`` (0-based, 10 batches ``A``..``J``),
    ``cask`` (0-based, 3 casks ``a``..``c`` per batch: a label, not a factor
    of its own), ``sample`` (0-based, the 30 casks batch:cask, nested in
    batch: sample // 3 == batch), two ``strength`` assays per sample;
    ``design`` is the intercept column of ``~ 1``."""

    batch: torch.Tensor
    cask: torch.Tensor
    sample: torch.Tensor
    strength: torch.Tensor
    design: torch.Tensor

    @property
    def num_batches(self) -> int:
        return int(self.batch.max()) + 1

    @property
    def num_samples(self) -> int:
        return int(self.sample.max()) + 1


def load_pastes(dtype=None) -> Pastes:
    """Load lme4's Pastes data (60 rows; nested random effects).

    Usage::

        data = load_pastes()
        data.num_batches, data.num_samples  # 10, 30
        bool((data.sample // 3 == data.batch).all())  # True: nested
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    rows = _read_rows("pastes.csv")
    batch = _codes([r["batch"] for r in rows])
    cask = _codes([r["cask"] for r in rows])
    sample = _codes([r["sample"] for r in rows])
    strength = torch.tensor([float(r["strength"]) for r in rows], dtype=dtype)
    return Pastes(batch, cask, sample, strength, torch.ones(len(rows), 1, dtype=dtype))


#: ``glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 |
#: LOCATION), data = grouseticks, family = poisson, control = <as above>)``
#: with ``cHEIGHT = HEIGHT - mean(HEIGHT)`` (R 4.2.2, glmmTMB 1.1.5, TMB
#: 1.9.2; Laplace, polished). Fixed effects (Intercept), YEAR96, YEAR97,
#: cHEIGHT; logLik includes −Σ log(TICKS!). lme4 1.1.31's ``glmer(...,
#: nAGQ = 1)`` (bobyqa) stops 2.3e-5 nats lower (logLik −890.271353492),
#: with fixed effects within 1.6e-5 and sds within 6.5e-6.
GROUSETICKS_GLMMTMB = {
    "fixed_effects": (0.3727816944, 1.180410174, -0.9786955127, -0.02376057496),
    "sds": {"brood": 0.750033685, "index": 0.5415088448, "location": 0.5287199639},
    "log_likelihood": -890.271330087,
}


class Grouseticks(NamedTuple):
    """The grouseticks data: ``ticks`` counted on the heads of red grouse
    chicks; ``index`` (0-based, one level per chick and row, 403),
    ``brood`` (0-based, 118 broods), ``location`` (0-based, 63 locations),
    ``year`` (0-based: 1995, 1996, 1997), ``height`` (altitude, m);
    ``design`` is ``~ YEAR + cHEIGHT`` in R's treatment coding (intercept,
    YEAR96, YEAR97, cHEIGHT = height - mean(height))."""

    index: torch.Tensor
    brood: torch.Tensor
    location: torch.Tensor
    year: torch.Tensor
    height: torch.Tensor
    ticks: torch.Tensor
    design: torch.Tensor

    @property
    def num_broods(self) -> int:
        return int(self.brood.max()) + 1

    @property
    def num_locations(self) -> int:
        return int(self.location.max()) + 1


def load_grouseticks(dtype=None) -> Grouseticks:
    """Load lme4's grouseticks data (403 rows; three grouping factors, one of
    them per observation).

    Usage::

        data = load_grouseticks()
        data.design.shape, data.num_broods, data.num_locations  # (403, 4), 118, 63
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    rows = _read_rows("grouseticks.csv")
    index = _codes([r["INDEX"] for r in rows])
    brood = _codes([r["BROOD"] for r in rows])
    location = _codes([r["LOCATION"] for r in rows])
    year = _codes([r["YEAR"] for r in rows])
    height64 = torch.tensor([float(r["HEIGHT"]) for r in rows], dtype=torch.float64)
    ticks = torch.tensor([float(r["TICKS"]) for r in rows], dtype=dtype)
    design = torch.nn.functional.one_hot(year, 3).to(dtype)
    design[:, 0] = 1.0  # intercept; columns 1-2 are YEAR96, YEAR97
    design = torch.cat([design, (height64 - height64.mean()).to(dtype).unsqueeze(-1)], -1)
    return Grouseticks(index, brood, location, year, height64.to(dtype), ticks, design)


#: ``glmmTMB(y ~ 1 + (1 | s) + (1 | d), data = InstEval, family = gaussian,
#: REML = FALSE, control = <as above>)`` (R 4.2.2, glmmTMB 1.1.5, TMB 1.9.2;
#: polished; glmmTMB takes 26 s, lmer 9 s). lme4 1.1.31's ``lmer(...,
#: REML = FALSE)`` agrees: logLik −118888.862990022 (difference 5e-9), sds
#: within 7.4e-7.
INSTEVAL_GLMMTMB = {
    "fixed_effects": (3.254151427,),
    "sds": {"s": 0.3258860143, "d": 0.5229633979},
    "residual_sd": 1.17778648,
    "log_likelihood": -118888.862990017,
}


class InstEval(NamedTuple):
    """The InstEval lecture evaluations: ``s`` (0-based, 2 972 students) and
    ``d`` (0-based, 1 128 lecturers) are crossed and unbalanced, ``y`` the
    rating 1..5; ``design`` is the intercept column of ``~ 1``. Codes follow
    R's level order (the labels sorted as numbers)."""

    s: torch.Tensor
    d: torch.Tensor
    y: torch.Tensor
    design: torch.Tensor

    @property
    def num_students(self) -> int:
        return int(self.s.max()) + 1

    @property
    def num_lecturers(self) -> int:
        return int(self.d.max()) + 1


def load_insteval(dtype=None) -> InstEval:
    """Load lme4's InstEval data, columns s, d, y only (73 421 rows; a
    scaling benchmark for crossed random effects).

    Usage::

        data = load_insteval()
        data.y.shape, data.num_students, data.num_lecturers  # (73421,), 2972, 1128
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    rows = _read_rows("insteval.csv.gz")
    s = _codes([r["s"] for r in rows])
    d = _codes([r["d"] for r in rows])
    y = torch.tensor([float(r["y"]) for r in rows], dtype=dtype)
    return InstEval(s, d, y, torch.ones(len(rows), 1, dtype=dtype))


# --- Data frames for formulas (curvi.glmm) ------------------------------------

#: The factor columns (grouping factors, categorical covariates, identifiers)
#: of each bundled CSV: :func:`load_frame` reads them as strings, so that a
#: formula treats them as factors (levels in sorted order, as R's for these
#: labels). All other columns are read as numbers.
_FRAME_FACTORS = {
    "cbpp": ("herd", "period"),
    "contraception": ("woman", "district", "livch", "urban"),
    "grouseticks": ("INDEX", "BROOD", "YEAR", "LOCATION"),
    "insteval": ("s", "d"),
    "pastes": ("batch", "cask", "sample"),
    "penicillin": ("plate", "sample"),
    "pima": (),
    "sleepstudy": ("Subject",),
}


def load_frame(name: str) -> pandas.DataFrame:
    """A bundled data set as a pandas DataFrame, as R sees it: the CSV's rows
    in order, its factor columns as strings (cbpp's ``herd`` "1".."15" and
    ``period`` "1".."4", grouseticks' ``YEAR`` "95".."97", sleepstudy's
    ``Subject``, ...) and the others as numbers. ``name`` is the file name
    with or without ``.csv`` / ``.csv.gz`` ("cbpp", "sleepstudy.csv",
    "insteval", ...), e.g. the ``dataset`` of a :func:`glmm_references`
    entry; see README.md in this folder for each data set.

    Usage::

        frame = load_frame("cbpp")
        frame.shape, sorted(set(frame["period"]))  # (56, 4), ['1', '2', '3', '4']
        load_frame("sleepstudy.csv")["Subject"].nunique()  # 18
    """
    import pandas

    files = {}
    for entry in resources.files(__package__).iterdir():
        for suffix in (".csv.gz", ".csv"):
            if entry.name.endswith(suffix):
                files[entry.name[: -len(suffix)]] = entry.name
                break
    stem = name.removesuffix(".gz").removesuffix(".csv")
    if stem not in files:
        raise ValueError(f"no bundled data set {name!r}; available: {', '.join(sorted(files))}")
    factors = _FRAME_FACTORS.get(stem, ())
    header = {"header": None, "names": _HEADERLESS[stem]} if stem in _HEADERLESS else {}
    with resources.as_file(resources.files(__package__).joinpath(files[stem])) as path:
        return pandas.read_csv(path, dtype={column: str for column in factors}, **header)


#: column names of the bundled files that have no header row (scikit-learn's digits)
_HEADERLESS = {"digits": [f"pixel{i}" for i in range(64)] + ["label"]}


def glmm_references() -> list[dict]:
    """The glmmTMB reference fits of ``glmm_reference.json`` (ten GLMMs on
    bundled data, made by ``benchmarks/reference/glmm.R``; the keys are
    described in README.md in this folder): one dict per case, with the
    model in R and in formulae syntax, the data set for :func:`load_frame`,
    estimates, standard errors and logLik.

    Usage::

        refs = glmm_references()
        refs[0]["name"], refs[0]["formula"]  # 'cbpp_binomial', 'p(incidence, size) ~ period + (1 | herd)'
        load_frame(refs[0]["dataset"]).shape  # (56, 4)
    """
    with resources.files(__package__).joinpath("glmm_reference.json").open() as f:
        return json.load(f)


# --- Handwritten digits (8 × 8) ----------------------------------------------

#: Rows of :func:`load_digits` held out by :func:`split_digits` by default.
DIGITS_NUM_TEST = 297

#: Grey levels above this are 1 in :func:`load_digits`'s binarised images
#: (pixels count the on-pixels of a 4 × 4 block: 0..16; 8..16 become 1).
DIGITS_THRESHOLD = 7


class Digits(NamedTuple):
    """The 8 × 8 handwritten digits: ``images`` (n, 64), the pixels of each
    image row by row (grey levels 0..16, or 0/1 binarised), and ``labels``
    (n,), the digit 0..9 (int64)."""

    images: torch.Tensor
    labels: torch.Tensor


def load_digits(binarize: bool = True, dtype=None) -> Digits:
    """Load the 1 797 handwritten digits scikit-learn ships (the test set of
    UCI's "Optical Recognition of Handwritten Digits", Alpaydin & Kaynak
    1998; source and licences in README.md and ``digits_licence.md`` in this
    folder), a small image benchmark for variational autoencoders.

    Each pixel counts the on-pixels of a 4 × 4 block of a 32 × 32 bitmap
    (0..16). With ``binarize=True`` (the default) a pixel is 1 when its
    count is above ``DIGITS_THRESHOLD`` = 7 (at least half the block on),
    else 0 -- a fixed threshold, not a random draw, so every run sees the
    same data; ``binarize=False`` returns the counts. Rows are in the file's
    order; :func:`split_digits` makes the fixed train/test split.

    Usage::

        data = load_digits()
        data.images.shape, data.labels.shape  # (1797, 64), (1797,)
        sorted(set(data.images.flatten().tolist()))  # [0.0, 1.0]
        int(load_digits(binarize=False).images.max())  # 16
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    res = resources.files(__package__).joinpath("digits.csv.gz")
    with res.open("rb") as raw, gzip.open(raw, "rt", newline="") as f:
        rows = [[int(v) for v in row] for row in csv.reader(f)]
    table = torch.tensor(rows)
    images, labels = table[:, :64], table[:, 64]
    if binarize:
        images = images > DIGITS_THRESHOLD
    return Digits(images.to(dtype), labels)


def split_digits(data: Digits, num_test: int = DIGITS_NUM_TEST, seed: int = 0) -> tuple[Digits, Digits]:
    """The fixed train/test split of :func:`load_digits`'s rows: rows sorted
    by the SHA-256 digest of ``f"{seed}:{i}"`` (i the 0-based row), the last
    ``num_test`` of that order the test set (297 by default: 1 500 train,
    297 test), each part in file order. A hash, not a random generator, so
    the split is the same under every version of torch and Python.

    Usage::

        train, test = split_digits(load_digits())
        train.images.shape, test.images.shape  # (1500, 64), (297, 64)
    """
    n = len(data.labels)
    if not 0 < num_test < n:
        raise ValueError(f"num_test must be between 1 and {n - 1} (the rows of data); got {num_test}")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    train = torch.tensor(sorted(order[:-num_test]))
    test = torch.tensor(sorted(order[-num_test:]))
    return Digits(data.images[train], data.labels[train]), Digits(data.images[test], data.labels[test])
