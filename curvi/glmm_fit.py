"""Fits of a :class:`~curvi.glmm.GLMM` and what a statistician reads off them.

:class:`MaximumLikelihoodFit` (``GLMM.fit("ml")``) holds the Laplace (or
adaptive Gauss–Hermite) maximum-likelihood fit and prints like glmmTMB's
summary; :class:`PosteriorFit` (``"guide"`` or ``"nuts"``) holds posterior
draws and prints like brms's. Both give the fixed effects by the formula's
column names, the random-effect standard deviations and correlations by
grouping factor, the random effects by level, ``predict(newdata)``,
``to_arviz()`` and the plots of :mod:`curvi.plots`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping

import pyro
import torch
from torch.distributions import biject_to

from .glmm import GLMM

__all__ = ["GLMMFit", "MaximumLikelihoodFit", "PosteriorFit", "fit_guide", "fit_ml", "fit_nuts"]


# ---- the three methods ------------------------------------------------------
def fit_ml(glmm: GLMM, *, quadrature=None, max_eval: int = 500, num_draws: int = 1000, seed: int = 0):
    """Laplace maximum likelihood (:func:`~curvi.mle.laplace_mle`) in a param
    store of its own, so that fits of several models do not share names."""
    from .mle import laplace_mle

    store = pyro.get_param_store()
    with torch.random.fork_rng(devices=[]), store.scope():
        torch.manual_seed(seed)
        laplace = laplace_mle(
            glmm.ml_model, glmm.response, unit_plate=glmm.unit_plate, quadrature=quadrature, max_eval=max_eval
        )
    if not laplace.converged:
        warnings.warn(
            f"curvi.glmm: the ML fit of {glmm.design.formula!r} {laplace.message}", RuntimeWarning, 3
        )
    return MaximumLikelihoodFit(glmm, laplace, num_draws=num_draws, seed=seed)


def fit_guide(
    glmm: GLMM,
    *,
    steps: int = 3000,
    quadrature=None,
    num_draws: int = 1000,
    seed: int = 0,
    progress: bool = False,
    **options,
):
    """The amortized Laplace guide trained by the ELBO (:func:`~curvi.fit.fit`'s default path)."""
    from .fit import fit
    from .guides import AmortizedLaplaceGuide

    store = pyro.get_param_store()
    with torch.random.fork_rng(devices=[]), store.scope():
        pyro.set_rng_seed(seed)
        kwargs = {} if quadrature is None else {"quadrature": quadrature}
        guide = AmortizedLaplaceGuide(glmm.model, unit_plate=glmm.unit_plate, **kwargs)
        start = time.perf_counter()
        result = fit(glmm.model, guide, glmm.response, steps=steps, progress=progress, **options)
        seconds = time.perf_counter() - start
        draws = _guide_draws(glmm, guide, num_draws)
    return PosteriorFit(glmm, draws, method="guide", info=result, seconds=seconds, guide=guide)


def fit_nuts(
    glmm: GLMM,
    *,
    num_samples: int = 1000,
    warmup_steps: int = 500,
    seed: int = 0,
    progress: bool = False,
    quadrature=None,
):
    """NUTS on the Laplace marginal of the globals; each draw's units from
    their Laplace conditional (:class:`~curvi.marginal.LaplaceMarginal`)."""
    from pyro.infer import MCMC, NUTS

    from .marginal import LaplaceMarginal

    store = pyro.get_param_store()
    with torch.random.fork_rng(devices=[]), store.scope():
        pyro.set_rng_seed(seed)
        kwargs = {} if quadrature is None else {"quadrature": quadrature}
        marginal = LaplaceMarginal(glmm.model, unit_plate=glmm.unit_plate, **kwargs)
        mcmc = MCMC(
            NUTS(marginal), num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
        )
        start = time.perf_counter()
        mcmc.run(glmm.response)
        draws = dict(mcmc.get_samples())
        divergent = sum(len(d) for d in mcmc.diagnostics().get("divergences", {}).values())
        if divergent:
            warnings.warn(
                f"curvi.glmm: NUTS had {divergent} divergent transitions of {num_samples}; its draws "
                "may be biased (more warmup_steps, or compare with fit('guide'))",
                RuntimeWarning,
                3,
            )
        draws.update(marginal.sample_locals(draws, glmm.response))
        seconds = time.perf_counter() - start
    return PosteriorFit(glmm, _shaped(glmm, draws), method="nuts", info=mcmc, seconds=seconds)


def _guide_draws(glmm, guide, num_draws):
    if hasattr(guide, "laplace_posterior"):
        draws = guide.laplace_posterior(glmm.response).sample(num_draws)
    else:  # several grouping factors: the guide's own joint draws
        draws = pyro.infer.Predictive(guide, num_samples=num_draws, parallel=False)(glmm.response)
    return _shaped(glmm, draws)


def _site_shapes(glmm):
    with pyro.poutine.block(), torch.no_grad():
        trace = pyro.poutine.trace(glmm.model).get_trace()
    latent = set(glmm.global_sites) | {sites["r"] for sites in glmm._sites}
    return {name: trace.nodes[name]["value"].shape for name in trace.nodes if name in latent}


def _shaped(glmm, draws):
    """Draws by the model's site names, shaped ``(S, *site shape)``."""
    shapes = _site_shapes(glmm)
    out = {}
    for name, shape in shapes.items():
        value = draws[name].detach()
        out[name] = value.reshape(value.shape[0], *shape)
    return out


# ---- results ------------------------------------------------------------------
class GLMMFit:
    """What every fit of a :class:`~curvi.glmm.GLMM` offers (see the module)."""

    method = ""

    def __init__(self, glmm: GLMM):
        self.glmm = glmm

    # draws by site, (S, *shape): set by the subclasses
    @property
    def draws(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def point(self) -> dict[str, torch.Tensor]:
        """The point values by site (estimates, or posterior means)."""
        raise NotImplementedError

    @property
    def fixed_effects(self) -> dict[str, float]:
        """The fixed effects by the formula's column names."""
        beta = self.point.get("beta")
        if beta is None:
            return {}
        return dict(zip(self.glmm.fixed_names, beta.tolist()))

    @property
    def variance_components(self) -> list[dict]:
        """Per random-effects block: ``factor``, ``columns``, ``sd`` (by column),
        ``cor`` (a k×k tensor, identity when uncorrelated)."""
        out = []
        for block, sites in zip(self.glmm.design.blocks, self.glmm._sites):
            sd = self.point[sites["sd"]]
            cor = (
                _correlation(self.point[sites["L"]])
                if "L" in sites
                else torch.eye(block.size, dtype=sd.dtype)
            )
            out.append(
                {"factor": block.factor, "columns": block.columns, "sd": sd, "cor": cor, "sites": sites}
            )
        return out

    @property
    def random_effects(self):
        """The random effects by grouping factor: a pandas DataFrame (levels ×
        columns), conditional modes for ML, posterior means otherwise."""
        import pandas as pd

        frames = {}
        for block, sites in zip(self.glmm.design.blocks, self.glmm._sites):
            values = self.point[sites["r"]].cpu().numpy()
            frame = pd.DataFrame(
                values, index=list(self.glmm.design.factors[block.factor].levels), columns=list(block.columns)
            )
            frames[block.factor] = frame if block.factor not in frames else frames[block.factor].join(frame)
        return frames

    def random_effect_intervals(self, factor: str, column: str | None = None, level: float = 0.9):
        """``(point, lower, upper, levels)`` of one random-effect column from the draws."""
        for block, sites in zip(self.glmm.design.blocks, self.glmm._sites):
            if block.factor != factor or (column is not None and column not in block.columns):
                continue
            j = 0 if column is None else block.columns.index(column)
            draws = self.draws[sites["r"]][..., j]
            tail = (1 - level) / 2
            q = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=draws.dtype), dim=0)
            return self.point[sites["r"]][:, j], q[0], q[1], self.glmm.design.factors[factor].levels
        raise ValueError(
            f"no random effect {column!r} on {factor!r}; the model has "
            f"{[(b.factor, b.columns) for b in self.glmm.design.blocks]}"
        )

    # ---- prediction ----------------------------------------------------------
    def predict(self, newdata=None, *, random_effects: bool = True, type: str = "response") -> torch.Tensor:
        """Predictions at the fit's rows or at ``newdata``.

        ``type="link"`` gives η, ``"response"`` the mean (a probability for
        binomial and Bernoulli). ``random_effects=False`` gives the
        population-level prediction (lme4's ``re.form = NA``); a level not
        seen in the fit contributes no random effect. ML fits predict at the
        estimates and conditional modes; posterior fits average over draws.
        """
        if type not in ("link", "response"):
            raise ValueError(f"type must be 'link' or 'response', got {type!r}")
        new = None if newdata is None else self.glmm.design.new_data(newdata)
        values = self._prediction_values()
        if not random_effects:
            values = {k: v for k, v in values.items() if not k.startswith("r_")}
        eta = self.glmm.linear_predictor(values, new)
        mean = eta if type == "link" else _inverse_link(self.glmm.family, eta)
        return mean if mean.dim() == 1 else mean.mean(0)

    def _prediction_values(self):
        return self.point

    # ---- export and plots ------------------------------------------------------------
    def to_arviz(self, **options):
        """The fit as ArviZ ``InferenceData`` (:func:`curvi.arviz.to_inference_data`):
        posterior draws named by site with the formula's coordinates,
        posterior predictive, pointwise log likelihood and observed data."""
        from .arviz import to_inference_data

        coords, dims = self._coords_and_dims()
        return to_inference_data(
            self.glmm.model, self.draws, self.glmm.response, coords=coords, dims=dims, **options
        )

    def _coords_and_dims(self):
        glmm = self.glmm
        coords = {"observation": list(range(glmm.design.num_observations))}
        dims = {"y": ["observation"]}
        if "beta" in self.draws:
            coords["fixed_effect"] = list(glmm.fixed_names)
            dims["beta"] = ["fixed_effect"]
        for block, sites in zip(glmm.design.blocks, glmm._sites):
            columns = f"{sites['r']}_column"
            coords[block.factor] = list(glmm.design.factors[block.factor].levels)
            coords[columns] = list(block.columns)
            dims[sites["r"]] = [block.factor, columns]
            dims[sites["sd"]] = [columns]
            if "L" in sites:
                coords[f"{columns}_"] = list(block.columns)
                dims[sites["L"]] = [columns, f"{columns}_"]
        return coords, dims

    def global_draws(self) -> dict[str, torch.Tensor]:
        """1-D draws of each global scalar by a readable name: fixed effects by
        column, ``sd(g: column)``, ``cor(g: a, b)``, ``sigma``, ``phi``."""
        out, draws = {}, self.draws
        if "beta" in draws:
            for j, name in enumerate(self.glmm.fixed_names):
                out[name] = draws["beta"][:, j]
        for component in self.variance_components:
            sites, columns, factor = component["sites"], component["columns"], component["factor"]
            for j, column in enumerate(columns):
                out[f"sd({factor}: {column})"] = draws[sites["sd"]][:, j]
            if "L" in sites:
                cor = _correlation(draws[sites["L"]])
                for a in range(len(columns)):
                    for b in range(a):
                        out[f"cor({factor}: {columns[b]}, {columns[a]})"] = cor[:, a, b]
        for name in ("sigma", "phi"):
            if name in draws:
                out[name] = draws[name]
        return out

    def plot_marginals(self, reference=None, *, out=None, **options):
        """Marginals of the globals (:func:`curvi.plots.plot_marginals`);
        ``reference`` another fit (e.g. NUTS) or a dict of draws, overlaid as a density."""
        from .plots import plot_marginals

        if isinstance(reference, GLMMFit):
            reference = reference.global_draws()
        draws = {k: v.cpu().numpy() for k, v in self.global_draws().items()}
        if reference is not None:
            reference = {k: torch.as_tensor(v).cpu().numpy() for k, v in reference.items()}
        return plot_marginals(draws, reference=reference, out=out, **options)

    def plot_caterpillar(self, factor: str | None = None, column: str | None = None, *, out=None, **options):
        """Caterpillar plot of one random-effect column (:func:`curvi.plots.plot_caterpillar`)."""
        from .plots import plot_caterpillar

        factor = factor or self.glmm.unit_plates[0]
        point, lower, upper, levels = self.random_effect_intervals(factor, column)
        options.setdefault("title", f"{factor}: {column or self._first_column(factor)} (90 % intervals)")
        return plot_caterpillar(point, lower, upper, labels=list(levels), out=out, **options)

    def curvature(self):
        """Eigen-analysis (:func:`curvi.eigen`) of the globals' curvature in the
        unconstrained space: the observed information for ML, the inverse
        covariance of the unconstrained draws for a posterior."""
        from .eigen import eigen

        precision, names = self._global_precision()
        return eigen(-precision, names=names)

    def plot_spectrum(self, *, out=None, **options):
        """The curvature spectrum of the globals (:func:`curvi.plots.plot_spectrum`)."""
        from .plots import plot_spectrum

        options.setdefault("title", "curvature of the globals (unconstrained)")
        return plot_spectrum(self.curvature(), out=out, **options)

    def _global_precision(self):
        names, columns = [], []
        for name in self.glmm.global_sites:
            transform = biject_to(self.glmm.priors[name].support)
            u = transform.inv(self.draws[name]).reshape(self.draws[name].shape[0], -1)
            columns.append(u)
            names += [name] if u.shape[1] == 1 else [f"{name}[{i}]" for i in range(u.shape[1])]
        u = torch.cat(columns, dim=1)
        return torch.linalg.inv(torch.cov(u.T).reshape(u.shape[1], u.shape[1])), _readable(self.glmm, names)

    def _first_column(self, factor):
        return next(b.columns[0] for b in self.glmm.design.blocks if b.factor == factor)

    def __repr__(self):
        return self.summary()


class MaximumLikelihoodFit(GLMMFit):
    """``GLMM.fit("ml")``: Laplace (or adaptive Gauss–Hermite) maximum likelihood.

    Usage::

        import curvi
        from curvi.datasets import load_frame

        cbpp = load_frame("cbpp")
        fit = curvi.glmm("p(incidence, size) ~ period + (1 | herd)", cbpp, family="binomial").fit("ml")
        fit.log_likelihood, fit.aic                          # -92.026, 194.05
        fit.predict(cbpp.head(2), random_effects=False)      # population-level probabilities
        fit.random_effect_intervals("herd")[1][:3]           # 5 % points of three herds

    :ivar LaplaceFit laplace: :func:`~curvi.mle.laplace_mle`'s result.

    ``draws`` (for ``to_arviz`` and the plots) are read off the fit: the
    globals from the Wald Gaussian of the estimates in the unconstrained
    space (the inverse observed information), and, independently of them,
    the random effects from their Laplace conditional at the estimates
    (lme4's ``condVar``, empirical Bayes). They describe the estimates'
    uncertainty; they are not a posterior.
    """

    method = "ml"

    def __init__(self, glmm: GLMM, laplace, *, num_draws: int = 1000, seed: int = 0):
        super().__init__(glmm)
        self.laplace = laplace
        self.num_draws, self.seed = num_draws, seed
        self._draws = None

    @property
    def log_likelihood(self) -> float:
        return self.laplace.log_likelihood

    @property
    def aic(self) -> float:
        return self.laplace.aic

    @property
    def bic(self) -> float:
        return self.laplace.bic

    @property
    def num_params(self) -> int:
        return self.laplace.num_params

    @property
    def converged(self) -> bool:
        return self.laplace.converged

    @property
    def point(self):
        values = dict(self.laplace.params)
        values.update(self.laplace.modes)
        return values

    @property
    def std_errors(self) -> dict[str, float]:
        """Standard errors of the fixed effects by column name."""
        se = self.laplace.std_errors.get("beta")
        return {} if se is None else dict(zip(self.glmm.fixed_names, se.tolist()))

    def _global_precision(self):
        names = []
        for name, value in self.laplace.params.items():
            n = biject_to(self.laplace._constraints[name]).inv(value).numel()
            names += [name] if n == 1 else [f"{name}[{i}]" for i in range(n)]
        return torch.linalg.inv(self.laplace.covariance), _readable(self.glmm, names)

    @property
    def draws(self):
        if self._draws is None:
            self._draws = self._wald_draws()
        return self._draws

    def _wald_draws(self):
        params, constraints = self.laplace.params, self.laplace._constraints
        names = list(params)
        flat = torch.cat([biject_to(constraints[n]).inv(params[n]).reshape(-1) for n in names])
        generator = torch.Generator(device=flat.device).manual_seed(self.seed)
        cov = self.laplace.covariance
        L, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
        if info.item() != 0 or not torch.isfinite(L).all():
            raise ValueError(
                f"the ML fit's covariance of {names} is not positive definite (parameters the data do "
                "not identify, or an estimate on a boundary): it has no Wald draws; read the estimates, "
                "or fit with method='guide' or 'nuts'"
            )
        noise = torch.randn(
            self.num_draws, flat.numel(), generator=generator, dtype=flat.dtype, device=flat.device
        )
        u = flat + noise @ L.T
        theta, offset = {}, 0
        for name in names:
            n = biject_to(constraints[name]).inv(params[name]).numel()
            piece = u[:, offset : offset + n].reshape(
                self.num_draws, *biject_to(constraints[name]).inverse_shape(params[name].shape)
            )
            theta[name] = biject_to(constraints[name])(piece)
            offset += n
        point = {name: value.unsqueeze(0) for name, value in params.items()}
        theta.update(_conditional_draws(self.glmm, point, self.num_draws, generator))
        return _shaped(self.glmm, theta)

    def summary(self) -> str:
        """glmmTMB's layout: family, formula, fit criteria, random effects, fixed effects."""
        glmm, design = self.glmm, self.glmm.design
        n = design.num_observations
        lines = [
            f" Family: {_family_label(glmm.family)}",
            f"Formula:          {design.formula}",
            f"Method: {_method_label(self.laplace.num_nodes)} maximum likelihood (curvi)",
            "",
            f"{'AIC':>9} {'BIC':>9} {'logLik':>9} {'deviance':>9} {'df.resid':>9}",
            f"{self.aic:9.1f} {self.bic:9.1f} {self.log_likelihood:9.1f} {-2 * self.log_likelihood:9.1f} "
            f"{n - self.num_params:9d}",
            "",
            "Random effects:",
        ]
        lines += _variance_table(self.variance_components, self.point.get("sigma"))
        groups = ", ".join(f"{name}, {len(f.levels)}" for name, f in design.factors.items())
        lines.append(f"Number of obs: {n}, groups:  {groups}")
        if "phi" in self.point:
            lines += ["", f"Dispersion parameter for nbinom2 family (): {self.point['phi'].item():.4g}"]
        lines += ["", "Conditional model:", _coefficient_table(self.fixed_effects, self.std_errors)]
        lines += ["", self.laplace.message]
        return "\n".join(lines)


class PosteriorFit(GLMMFit):
    """``GLMM.fit("guide")`` or ``GLMM.fit("nuts")``: posterior draws.

    Usage::

        import curvi
        from curvi.datasets import load_frame

        model = curvi.glmm("strength ~ 1 + (1 | batch)", load_frame("pastes"))
        posterior = model.fit("guide", num_draws=500)
        print(posterior)                                     # brms's layout
        posterior.global_draws()["sd(batch: Intercept)"].mean()
        posterior.predict()[:3]                              # posterior mean per row

    :ivar dict draws: constrained draws by site, ``(S, *site shape)``.
    :ivar info: the :class:`~curvi.fit.FitResult` (guide: ``info.elbo``) or
        Pyro's ``MCMC`` (NUTS).
    :ivar float seconds: the fit's time.
    """

    def __init__(self, glmm: GLMM, draws: Mapping[str, torch.Tensor], *, method, info, seconds, guide=None):
        super().__init__(glmm)
        self._draws, self.method, self.info, self.seconds, self.guide = (
            dict(draws),
            method,
            info,
            seconds,
            guide,
        )

    @property
    def draws(self):
        return self._draws

    @property
    def point(self):
        return {name: value.mean(0) for name, value in self._draws.items()}

    def _prediction_values(self):
        return self._draws

    @property
    def elbo(self):
        """The ELBO trace of a guide fit (None for NUTS)."""
        return getattr(self.info, "elbo", None)

    def plot_elbo(self, *, out=None, **options):
        from .plots import plot_elbo

        if self.elbo is None:
            raise ValueError("plot_elbo: a NUTS fit has no ELBO trace (fit with method='guide')")
        return plot_elbo(self.elbo, out=out, **options)

    def summary(self) -> str:
        """brms's layout: family, formula, draws, multilevel hyperparameters,
        regression coefficients, further distributional parameters."""
        glmm, design = self.glmm, self.glmm.design
        draws = self.global_draws()
        S = next(iter(self._draws.values())).shape[0]
        how = {"guide": "AmortizedLaplaceGuide (curvi.fit)", "nuts": "NUTS on the Laplace marginal"}[
            self.method
        ]
        lines = [
            f" Family: {glmm.family}",
            f"  Links: mu = {_link(glmm.family)}",
            f"Formula: {design.formula}",
            f"   Data: (Number of observations: {design.num_observations})",
            f"  Draws: {S} from {how}, {self.seconds:.1f} s",
            "",
            "Multilevel Hyperparameters:",
        ]
        diagnostics = self.method == "nuts"
        for name, factor in design.factors.items():
            lines.append(f"~{name} (Number of levels: {len(factor.levels)})")
            rows = {}
            for component in self.variance_components:
                if component["factor"] != name:
                    continue
                for column in component["columns"]:
                    rows[f"sd({column})"] = draws[f"sd({name}: {column})"]
                for key, value in draws.items():
                    if key.startswith(f"cor({name}: ") and any(c in key for c in component["columns"]):
                        rows[key.replace(f"{name}: ", "").replace(", ", ",")] = value
            lines += _posterior_table(rows, diagnostics)
            lines.append("")
        lines.append("Regression Coefficients:")
        lines += _posterior_table({k: draws[k] for k in glmm.fixed_names}, diagnostics)
        further = {k: draws[k] for k in ("sigma", "phi") if k in draws}
        if further:
            lines += ["", "Further Distributional Parameters:"] + _posterior_table(further, diagnostics)
        return "\n".join(lines)


def _conditional_draws(glmm, theta_values, num, generator):
    """``num`` draws of the random effects from their Laplace conditional at
    one value of the globals (one Newton solve and one factorisation)."""
    from .factors import FactorView
    from .model import ModelView
    from .modes import solve_modes, warn_unconverged
    from .sparse_laplace import solve_joint_modes

    theta_values = {k: v[0] for k, v in theta_values.items()}
    plate = glmm.unit_plate
    if isinstance(plate, tuple):
        view = FactorView(glmm.model, glmm.response, unit_plate=plate)
        theta = view.pack_globals(theta_values)
        modes = solve_joint_modes(view, theta, view.init_y)
        warn_unconverged(modes)
        x = modes.y + modes.step
        eps = torch.randn(x.shape[0], num, generator=generator, dtype=x.dtype, device=x.device)
        factor = modes.pattern.lower.factor(modes.precision)
        noise = torch.as_tensor(factor.draw(eps.cpu().numpy()), dtype=x.dtype, device=x.device)
        samples = (x.unsqueeze(-1) + noise).T
    else:
        view = ModelView(glmm.model, glmm.response, unit_plate=plate)
        theta = view.pack_globals(theta_values)
        result = solve_modes(view, theta, view.init_y)
        warn_unconverged(result)
        y = result.y
        L = torch.linalg.cholesky(result.precision)
        eps = torch.randn((num, *y.shape), generator=generator, dtype=y.dtype, device=y.device)
        samples = y + torch.linalg.solve_triangular(L.mT, eps.unsqueeze(-1), upper=True).squeeze(-1)
    draws = [view.unpack(theta, sample) for sample in samples]
    return {name: torch.stack([d[name] for d in draws]) for name in view.local_sites}


# ---- helpers ------------------------------------------------------------------
def _method_label(nodes):
    return "Laplace" if nodes == 1 else f"adaptive Gauss-Hermite ({nodes} nodes)"


def _readable(glmm, names):
    """``beta[1]`` as the formula's column name; other coordinates as they are."""
    fixed = {f"beta[{i}]": name for i, name in enumerate(glmm.fixed_names)}
    if len(glmm.fixed_names) == 1:
        fixed["beta"] = glmm.fixed_names[0]
    return [fixed.get(n, n) for n in names]


def _correlation(L):
    return L @ L.transpose(-1, -2)


def _inverse_link(family, eta):
    if family == "gaussian":
        return eta
    if family in ("binomial", "bernoulli"):
        return torch.sigmoid(eta)
    return eta.exp()


def _link(family):
    from .glmm import FAMILIES

    return FAMILIES[family]


def _family_label(family):
    names = {"negativebinomial": "nbinom2", "bernoulli": "binomial"}
    return f"{names.get(family, family)}  ( {_link(family)} )"


def _variance_table(components, sigma):
    rows = [f" {'Groups':<10} {'Name':<12} {'Variance':>10} {'Std.Dev.':>10} Corr"]
    for component in components:
        sd, cor = component["sd"], component["cor"]
        for j, column in enumerate(component["columns"]):
            group = component["factor"] if j == 0 else ""
            corr = " ".join(f"{cor[j, i].item():5.2f}" for i in range(j)) if "L" in component["sites"] else ""
            rows.append(
                f" {group:<10} {column:<12} {sd[j].item() ** 2:10.4g} {sd[j].item():10.4g} {corr}".rstrip()
            )
    if sigma is not None:
        rows.append(f" {'Residual':<10} {'':<12} {sigma.item() ** 2:10.4g} {sigma.item():10.4g}")
    return rows


def _coefficient_table(estimates, std_errors):
    normal = torch.distributions.Normal(0.0, 1.0)
    width = max([len(k) for k in estimates] + [8])
    lines = [f"{'':<{width}} {'Estimate':>10} {'Std. Error':>10} {'z value':>8} {'Pr(>|z|)':>10}"]
    for name, value in estimates.items():
        se = std_errors[name]
        z = value / se if se > 0 else math.nan
        p = 2 * normal.cdf(torch.tensor(-abs(z), dtype=torch.float64)).item() if se > 0 else math.nan
        lines.append(f"{name:<{width}} {value:10.4f} {se:10.4f} {z:8.3f} {p:10.3g}")
    return "\n".join(lines)


def _posterior_table(rows, diagnostics):
    if not rows:
        return []
    width = max(len(k) for k in rows) + 1
    header = f"{'':<{width}} {'Estimate':>9} {'Est.Error':>9} {'l-95% CI':>9} {'u-95% CI':>9}"
    if diagnostics:
        header += f" {'Rhat':>5} {'Bulk_ESS':>8}"
    lines = [header]
    for name, x in rows.items():
        q = torch.quantile(x, torch.tensor([0.025, 0.975], dtype=x.dtype))
        line = f"{name:<{width}} {x.mean():9.2f} {x.std():9.2f} {q[0]:9.2f} {q[1]:9.2f}"
        if diagnostics:
            from pyro.ops.stats import effective_sample_size, split_gelman_rubin

            chain = x.reshape(1, -1)
            line += f" {split_gelman_rubin(chain).item():5.2f} {effective_sample_size(chain).item():8.0f}"
        lines.append(line)
    return lines
