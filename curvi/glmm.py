"""lme4-style GLMMs: a formula and a data frame become a Pyro model that any
curvi method fits.

``curvi.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)",
cbpp, family="binomial")`` reads the formula (:mod:`curvi.formula`) and
builds two Pyro models over the same tensors: :attr:`GLMM.model`, with
priors on the global parameters (for the guide and NUTS), and
:attr:`GLMM.ml_model`, whose globals are ``pyro.param`` sites (for maximum
likelihood). :meth:`GLMM.fit` runs

- ``method="ml"``: :func:`~curvi.mle.laplace_mle` (Laplace, or adaptive
  Gauss–Hermite with ``quadrature=``, as glmer's nAGQ), a glmmTMB-style summary;
- ``method="guide"``: :class:`~curvi.guides.AmortizedLaplaceGuide` trained by
  :func:`~curvi.fit.fit`, a brms-style summary of its draws;
- ``method="nuts"``: Pyro's NUTS on :class:`~curvi.marginal.LaplaceMarginal`
  (the units integrated out), the units drawn from their Laplace conditional.

The sites are named for the formula: ``beta`` (the fixed effects, in the
order of :attr:`GLMM.fixed_names`), and per bar on grouping factor ``g``:
``sd_g`` (the random effects' standard deviations), ``L_g`` (the Cholesky
factor of their correlation matrix, for ``(1 + x | g)``) and ``r_g`` (the
random effects, ``(levels, columns)``, in the plate ``g``); a second bar on
the same factor gets the suffix ``_2``. ``sigma`` is the Gaussian residual
standard deviation, ``phi`` the negative binomial's dispersion
(variance μ + μ²/φ, glmmTMB's nbinom2).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .formula import Design, read_formula

__all__ = ["GLMM", "FAMILIES", "glmm"]

#: the families and their links
FAMILIES = {
    "gaussian": "identity",
    "binomial": "logit",
    "bernoulli": "logit",
    "poisson": "log",
    "negativebinomial": "log",
}
_ALIASES = {"nbinom2": "negativebinomial", "negbinomial": "negativebinomial", "normal": "gaussian"}


def glmm(
    formula: str, data, *, family: str = "gaussian", priors: Mapping | None = None, weights=None, dtype=None
):
    """A GLMM from an lme4-style formula.

    Usage::

        import curvi
        from curvi.datasets import load_frame

        cbpp = load_frame("cbpp")
        model = curvi.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)",
                           cbpp, family="binomial")
        fit = model.fit()                    # Laplace maximum likelihood
        print(fit)                           # logLik -92.03, as glmmTMB
        fit.fixed_effects["period[2]"]       # -0.992

    :param str formula: ``response ~ fixed + (expr | g) + ...``. The response
        is a column (0/1 for binomial or Bernoulli), ``cbind(successes,
        failures)`` (lme4) or ``p(successes, trials)`` (Bambi). Fixed
        effects take formulae's syntax: factors (string columns, or
        ``C(x)``), interactions ``a:b`` and ``a*b``, ``I(x**2)``, numpy
        transformations ``np.log(x)``, ``offset(...)``. Random effects:
        ``(1 | g)``, ``(1 + x | g)`` (correlated), ``(x || g)`` (uncorrelated),
        ``(1 | g1/g2)`` (nested), ``(1 | g1:g2)``, and several grouping
        factors, crossed or nested.
    :param data: a pandas DataFrame.
    :param str family: ``"gaussian"``, ``"binomial"``, ``"bernoulli"``,
        ``"poisson"`` or ``"negativebinomial"`` (nbinom2).
    :param dict priors: replaces default priors by site name (``"beta"``,
        ``"sd_g"``, ``"L_g"``, ``"sigma"``, ``"phi"``), each a Pyro
        distribution of the site's shape. The defaults are weakly
        informative, on the scale of the response (s = sd of a Gaussian
        response, else 1): ``beta`` Normal(0, 2.5 s / sd(column)), the
        intercept Normal(mean, 10 s); standard deviations HalfNormal(2.5 s);
        correlations LKJ(1); ``phi`` Gamma(0.01, 0.01) (brms's default).
    :param weights: a column name or one value per row: each row's
        log-likelihood is multiplied by its weight (glmmTMB's ``weights``
        for these families). Rows of weight 0 are left out.
    :param dtype: of the tensors; default float64 (the precision the
        reference comparisons with glmmTMB need).
    :returns: a :class:`GLMM`.
    """
    family = _family(family)
    design = read_formula(formula, data, family=family, weights=weights, dtype=dtype or torch.float64)
    if family == "binomial" and design.trials is None:
        family = "bernoulli"  # a 0/1 response, as glmer reads it
    return GLMM(design, family, priors)


def _family(family):
    if not isinstance(family, str):
        raise ValueError(f"family must be a string, one of {sorted(FAMILIES)}; got {family!r}")
    name = _ALIASES.get(family.lower(), family.lower())
    if name not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; curvi.glmm knows {sorted(FAMILIES)}")
    return name


class GLMM:
    """A formula's GLMM as Pyro models (see :func:`glmm`).

    :ivar Design design: the formula evaluated on the data.
    :ivar str family: the family (a 0/1 binomial response is Bernoulli).
    """

    def __init__(self, design: Design, family: str, priors: Mapping | None = None):
        self.design, self.family = design, family
        self._sites = _site_names(design)
        self.priors = self._default_priors()
        unknown = set(priors or {}) - set(self.priors)
        if unknown:
            raise ValueError(
                f"priors name {sorted(unknown)}, which are not global sites of this model; "
                f"its global sites are {sorted(self.priors)}"
            )
        for name, prior in (priors or {}).items():
            if not isinstance(prior, torch.distributions.Distribution):
                raise ValueError(f"priors[{name!r}] must be a Pyro distribution, got {type(prior)}")
            self.priors[name] = prior

    # ---- names -----------------------------------------------------------
    @property
    def fixed_names(self) -> tuple[str, ...]:
        """The fixed effects' column names, formulae's (``"Intercept"``, ``"period[2]"``)."""
        return self.design.fixed_names

    @property
    def unit_plates(self) -> tuple[str, ...]:
        """The grouping factors (one Pyro plate each)."""
        return tuple(self.design.factors)

    @property
    def unit_plate(self):
        """The ``unit_plate`` argument for curvi: the plate, or the plates' tuple."""
        plates = self.unit_plates
        if not plates:
            raise ValueError(
                f"formula {self.design.formula!r} has no random effects; curvi's methods integrate "
                "random effects (add a term like (1 | g))"
            )
        return plates[0] if len(plates) == 1 else plates

    def block_sites(self, block_index: int) -> dict[str, str]:
        """Site names of one random-effects block: ``{"sd", "L" (if correlated), "r"}``."""
        return dict(self._sites[block_index])

    @property
    def global_sites(self) -> tuple[str, ...]:
        return tuple(self.priors)

    @property
    def response(self) -> torch.Tensor:
        return self.design.response

    # ---- the Pyro models ---------------------------------------------------
    def model(self, response: torch.Tensor | None = None) -> torch.Tensor:
        """The GLMM with priors on its globals (for the guide and NUTS).

        ``response`` defaults to None (draw it); pass :attr:`response` to
        condition on the data.
        """
        globals_ = {name: pyro.sample(name, prior) for name, prior in self.priors.items()}
        return self._likelihood(globals_, response)

    def ml_model(self, response: torch.Tensor | None = None) -> torch.Tensor:
        """The GLMM with its globals as ``pyro.param`` sites (for maximum likelihood)."""
        globals_ = {
            name: pyro.param(name, init, constraint=constraint)
            for name, (init, constraint) in self._starting_values.items()
        }
        return self._likelihood(globals_, response)

    def linear_predictor(self, values: Mapping[str, torch.Tensor], new=None, *, in_model=False):
        """η from global and random-effect values, batched over the leading
        dims of the draws (``beta`` ``(..., p)``); ``new`` is
        :meth:`Design.new_data`'s output for other rows, where a level not
        seen in the fit (index −1) adds no random effect. ``in_model``: inside
        the Pyro model, where ``beta``'s batch dims already align with the
        observation plate."""
        design = self.design
        if new is None:
            fixed, offset = design.fixed, design.offset
            index = {name: f.index for name, f in design.factors.items()}
            designs = [b.design for b in design.blocks]
        else:
            fixed, offset, index, designs = new
        if fixed.shape[-1]:
            beta = values["beta"] if in_model else values["beta"].unsqueeze(-2)
            eta = (beta * fixed).sum(-1)
        else:
            eta = fixed.new_zeros(fixed.shape[0])
        if offset is not None:
            eta = eta + offset
        for block, sites, z in zip(design.blocks, self._sites, designs):
            r = values.get(sites["r"])
            if r is None:
                continue
            idx = index[block.factor]
            picked = r[..., idx.clamp(min=0), :]
            if new is not None:
                picked = picked * (idx >= 0).unsqueeze(-1).to(r.dtype)
            eta = eta + (z * picked).sum(-1)
        return eta

    def _likelihood(self, g, response):
        design = self.design
        effects = dict(g)
        for factor in design.factors.values():
            with pyro.plate(factor.name, len(factor.levels)):
                for block, sites in zip(design.blocks, self._sites):
                    if block.factor == factor.name:
                        effects[sites["r"]] = pyro.sample(sites["r"], self._effects_prior(block, sites, g))
        eta = self.linear_predictor(effects, in_model=True)
        with pyro.plate("observations", design.num_observations):
            likelihood = self._observation(eta, g)
            if design.weights is not None:
                positive = design.weights > 0
                with (
                    pyro.poutine.mask(mask=positive),
                    pyro.poutine.scale(
                        scale=torch.where(positive, design.weights, torch.ones_like(design.weights))
                    ),
                ):
                    return pyro.sample("y", likelihood, obs=response)
            return pyro.sample("y", likelihood, obs=response)

    def _effects_prior(self, block, sites, g):
        sd = g[sites["sd"]]
        zero = sd.new_zeros(block.size)
        if "L" in sites:
            return dist.MultivariateNormal(zero, scale_tril=sd.unsqueeze(-1) * g[sites["L"]])
        return dist.Normal(zero, sd).to_event(1)

    def _observation(self, eta, g):
        family, design = self.family, self.design
        if family == "gaussian":
            return dist.Normal(eta, g["sigma"])  # its batch dims align with the observation plate
        if family == "binomial":
            return dist.Binomial(total_count=design.trials, logits=eta)
        if family == "bernoulli":
            return dist.Bernoulli(logits=eta)
        if family == "poisson":
            return dist.Poisson(eta.exp())
        phi = g["phi"]
        return dist.NegativeBinomial(total_count=phi, logits=eta - phi.log())

    # ---- priors and starting values -------------------------------------------
    def _scale(self):
        if self.family == "gaussian":
            return self.design.response.std().clamp(min=1e-8)
        return self.design.response.new_tensor(1.0)

    def _default_priors(self):
        design, s = self.design, self._scale()
        priors = {}
        if design.fixed.shape[-1]:
            priors["beta"] = _fixed_prior(design, self.family, s)
        for block, sites in zip(design.blocks, self._sites):
            priors[sites["sd"]] = dist.HalfNormal(2.5 * s * torch.ones_like(block.design[0])).to_event(1)
            if "L" in sites:
                priors[sites["L"]] = dist.LKJCholesky(block.size, s.new_tensor(1.0))
        if self.family == "gaussian":
            priors["sigma"] = dist.HalfNormal(2.5 * s)
        if self.family == "negativebinomial":
            priors["phi"] = dist.Gamma(s.new_tensor(0.01), s.new_tensor(0.01))
        return priors

    @functools.cached_property
    def _starting_values(self):
        """:meth:`_param_inits`, computed once (``ml_model`` runs at every evaluation)."""
        return self._param_inits()

    def _param_inits(self):
        """Starting values for maximum likelihood: the fixed effects of the
        GLM without random effects (a few IRLS steps), its residual sd for a
        Gaussian, and random-effect sds of half the response's scale per unit
        of each column."""
        design = self.design
        beta, sigma = _glm_start(design, self.family)
        scale = sigma if sigma is not None else beta.new_tensor(1.0)
        inits = {}
        if design.fixed.shape[-1]:
            inits["beta"] = (beta, constraints.real)
        for block, sites in zip(design.blocks, self._sites):
            rms = block.design.pow(2).mean(0).sqrt().clamp(min=1e-8)
            inits[sites["sd"]] = (0.5 * scale / rms, constraints.positive)
            if "L" in sites:
                eye = torch.eye(block.size, dtype=beta.dtype, device=beta.device)
                inits[sites["L"]] = (eye, constraints.corr_cholesky)
        if self.family == "gaussian":
            inits["sigma"] = (sigma, constraints.positive)
        if self.family == "negativebinomial":
            inits["phi"] = (beta.new_tensor(1.0), constraints.positive)
        return inits

    # ---- fitting ---------------------------------------------------------
    def fit(self, method: str = "ml", **options):
        """Fit by one of curvi's methods.

        Usage::

            import curvi
            from curvi.datasets import load_frame

            model = curvi.glmm("Reaction ~ Days + (Days | Subject)", load_frame("sleepstudy"))
            ml = model.fit("ml")                  # glmmTMB-style summary
            ml.random_effects["Subject"].head()   # conditional modes by level

        :param str method: ``"ml"`` (Laplace maximum likelihood; options:
            ``quadrature``, ``max_eval``), ``"guide"`` (the amortized Laplace
            guide trained by the ELBO; options: ``steps``, ``quadrature``,
            ``num_draws``, ``progress``, ``seed``) or ``"nuts"`` (NUTS on the
            Laplace marginal; options: ``num_samples``, ``warmup_steps``,
            ``seed``, ``progress``).
        :returns: an :class:`~curvi.glmm_fit.MaximumLikelihoodFit` or a
            :class:`~curvi.glmm_fit.PosteriorFit`.
        """
        from . import glmm_fit

        runners = {"ml": glmm_fit.fit_ml, "guide": glmm_fit.fit_guide, "nuts": glmm_fit.fit_nuts}
        if method not in runners:
            raise ValueError(f"method must be one of {sorted(runners)}, got {method!r}")
        return runners[method](self, **options)

    def __repr__(self):
        n = self.design.num_observations
        return f"GLMM({self.design.formula!r}, family={self.family!r}, {n} observations)"


def _site_names(design):
    counts, sites = {}, []
    for block in design.blocks:
        counts[block.factor] = counts.get(block.factor, 0) + 1
        suffix = "" if counts[block.factor] == 1 else f"_{counts[block.factor]}"
        names = {"sd": f"sd_{block.factor}{suffix}", "r": f"r_{block.factor}{suffix}"}
        if block.correlated:
            names["L"] = f"L_{block.factor}{suffix}"
        sites.append(names)
    return sites


def _fixed_prior(design, family, s):
    x = design.fixed
    spread = x.std(0)
    constant = spread < 1e-12
    scale = torch.where(constant, 10 * s, 2.5 * s / spread.clamp(min=1e-12))
    loc = x.new_zeros(x.shape[-1])
    if family == "gaussian" and "Intercept" in design.fixed_names:
        loc[design.fixed_names.index("Intercept")] = design.response.mean()
    return dist.Normal(loc, scale).to_event(1)


def _glm_start(design, family, steps=8):
    """Fixed effects of the GLM without random effects by IRLS from the
    intercept at the link of the mean (ridge 1e-6 for safety), and the
    residual sd of a Gaussian response."""
    x, y = design.fixed, design.response
    offset = design.offset if design.offset is not None else torch.zeros_like(y)
    beta = x.new_zeros(x.shape[-1])
    if "Intercept" in design.fixed_names:
        beta[design.fixed_names.index("Intercept")] = _link_of_mean(design, family)
    ridge = 1e-6 * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(steps if x.shape[-1] else 0):
        eta = x @ beta + offset
        if family == "gaussian":
            mean, variance = eta, torch.ones_like(eta)
        elif family in ("binomial", "bernoulli"):
            trials = design.trials if design.trials is not None else torch.ones_like(y)
            p = torch.sigmoid(eta)
            mean, variance = trials * p, trials * p * (1 - p)
        else:
            mean = eta.clamp(max=30).exp()
            variance = mean
        variance = variance.clamp(min=1e-8)
        working = eta - offset + (y - mean) / variance
        weighted = x * variance.unsqueeze(-1)
        beta = torch.linalg.solve(x.T @ weighted + ridge, weighted.T @ working)
        if family == "gaussian":
            break
    if not torch.isfinite(beta).all():  # separation or overflow: the plain start
        beta = x.new_zeros(x.shape[-1])
    sigma = None
    if family == "gaussian":
        sigma = (y - x @ beta - offset).std().clamp(min=1e-8) if x.shape[-1] else y.std().clamp(min=1e-8)
    return beta, sigma


def _link_of_mean(design, family):
    y = design.response
    if family == "gaussian":
        return y.mean()
    if family in ("binomial", "bernoulli"):
        p = (y.sum() / (design.trials.sum() if design.trials is not None else len(y))).clamp(0.01, 0.99)
        return torch.log(p / (1 - p))
    mean = y.mean().clamp(min=0.01)
    if design.offset is not None:
        return mean.log() - design.offset.mean()
    return mean.log()
