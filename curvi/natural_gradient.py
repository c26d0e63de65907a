"""Natural-gradient steps for Gaussian guides: the Bayesian learning rule.

For a Gaussian q = N(m, S⁻¹) over the unconstrained latents x, the natural
gradient of the ELBO in q's natural parameters gives the Bayesian learning
rule (Khan & Rue, 2023) with step size ρ:

    Ŝ  = −E_q[∇² log p(x)]                      (expected curvature)
    S' = (1 − ρ) S + ρ Ŝ
    m' = m + ρ S'⁻¹ E_q[∇ log p(x)]

Each expectation is a Monte Carlo average over ``num_samples`` draws of q
(``num_samples=0``: at the mean, exact when log p is quadratic). On a
Gaussian model one step with ρ = 1 lands on the exact posterior. Where Ŝ is
not positive definite (log p not concave over q), S' may not be either; the
*improved* rule of Lin, Schmidt & Khan (2020) adds ρ²/2 · G S⁻¹ G with
G = Ŝ − S, which keeps S' positive definite for any Ŝ without a line search:

    S' = S + ρ G + (ρ²/2) G S⁻¹ G.

``correction="auto"`` (the default) uses it exactly when the plain S' is not
positive definite, so steps stay exact where the plain rule is safe.

:class:`NaturalGradient` is a Pyro optimiser that comes with its own loss
(``optim.loss``, a :class:`NaturalGradientLoss`): the loss estimates the
expectations from draws of q and records them, the optimiser takes the
step from the record, ``SVI(model, guide, optim, optim.loss)``. Supported
guides: Pyro's ``AutoMultivariateNormal`` (full S) and ``AutoNormal`` /
``AutoDiagonalNormal`` (diagonal S, from the diagonal of the expected
Hessian).

**References**

1. M. E. Khan, H. Rue, *The Bayesian Learning Rule*, JMLR 24 (2023).
2. W. Lin, M. Schmidt, M. E. Khan, *Handling the Positive-Definite
   Constraint in the Bayesian Learning Rule*, ICML 2020.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Iterable
from typing import NamedTuple

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal
from pyro.poutine.util import site_is_subsample

from .guide_moments import FlatLayout, batched_log_density, flat_log_density, gaussian_view
from .tensor_ops import hessian_rows, symmetrize

__all__ = ["NaturalGradient", "NaturalGradientLoss", "StepRecord"]

_USAGE = "optim = NaturalGradient(...); svi = SVI(model, guide, optim, optim.loss)"
_STATE_KEY = "curvi.NaturalGradient"  # the optimiser's counters in get_state()


class StepRecord(NamedTuple):
    """What :meth:`NaturalGradientLoss.loss_and_grads` measured for one step,
    in q's flat unconstrained coordinates (those of ``guide_moments.FlatLayout``).

    :ivar guide: the guide the draws came from.
    :ivar mean: q's mean m, ``(d,)``.
    :ivar precision: q's precision S, ``(d, d)`` (its diagonal ``(d,)`` when
        ``diagonal``).
    :ivar grad: E_q[∇ log p], ``(d,)``.
    :ivar hess: E_q[∇² log p] (or its Bonnet–Price estimate), ``(d, d)``
        (its diagonal when ``diagonal``).
    :ivar bool diagonal: whether q is mean field.
    :ivar float loss: −ELBO estimated from the draws.
    :ivar layout: the flat layout of the guide's latent sites.
    :ivar adapter: reads q from the guide and maps a new mean and precision
        back to its parameters.
    """

    guide: Callable
    mean: torch.Tensor
    precision: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor
    diagonal: bool
    loss: float
    layout: FlatLayout
    adapter: object


class NaturalGradientLoss(pyro.infer.Trace_ELBO):
    r"""The loss of :class:`NaturalGradient`: measures, records, returns −ELBO.

    Made by :class:`NaturalGradient` as its ``loss`` attribute; pass that to
    :class:`~pyro.infer.SVI` or :func:`curvi.fit` with the optimiser.
    ``loss_and_grads`` draws ``num_samples`` points of q (one vectorised
    model run when the model broadcasts over them), estimates E_q[∇ log p]
    and E_q[∇² log p] there and keeps them as :attr:`record` (a
    :class:`StepRecord`) for the optimiser; it writes no ``.grad``. It
    returns ``-ELBO`` at the current parameters, estimated from the same
    draws (the mean of log p over them plus q's entropy in closed form, so
    no extra model run), or with ``num_samples=0`` by ``Trace_ELBO`` with
    ``elbo_particles`` particles. ``loss`` (Pyro's ``Trace_ELBO`` estimate)
    works as for any ELBO; ``differentiable_loss`` does not exist, as the
    step is not the gradient of a loss.

    :param int num_samples: draws of q per expectation (0: at the mean).
    :param str curvature: ``"hessian"`` or ``"gradient"`` (see
        :class:`NaturalGradient`).
    :param bool antithetic: draw an even ``num_samples`` in mirrored pairs.
    :param int elbo_particles: particles of the returned ELBO estimate when
        ``num_samples=0``.
    """

    def __init__(
        self,
        num_samples: int = 1,
        *,
        curvature: str = "hessian",
        antithetic: bool = True,
        elbo_particles: int = 1,
    ) -> None:
        _check_int("num_samples", num_samples, 0)
        _check_choice("curvature", curvature, ("hessian", "gradient"))
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be True or False, got {antithetic!r}")
        _check_int("elbo_particles", elbo_particles, 1)
        super().__init__(num_particles=elbo_particles, vectorize_particles=True)
        self.num_samples, self.curvature = num_samples, curvature
        self.antithetic = antithetic and num_samples >= 2 and num_samples % 2 == 0
        self._layouts = weakref.WeakKeyDictionary()
        #: the :class:`StepRecord` of the last ``loss_and_grads`` not yet
        #: taken by the optimiser (``None`` when there is none)
        self.record: StepRecord | None = None

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """Not available: the natural-gradient step is not the gradient of a
        loss. Raises :class:`NotImplementedError` naming the way to use it."""
        raise NotImplementedError(
            "NaturalGradient's step is not the gradient of a loss; its loss records the step in "
            f"loss_and_grads and the optimiser takes it: {_USAGE}"
        )

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Estimate E_q[∇ log p] and E_q[∇² log p] from draws of q, keep them
        as :attr:`record`, and return ``-ELBO`` estimated from the draws."""
        self.record = None
        adapter = _adapter(guide)
        if self.num_samples == 0:  # no draws to estimate the ELBO from
            loss = self.loss(model, guide, *args, **kwargs)
        else:
            # one guide run (no model run): sets the guide up on the first
            # step, and shows its parameters to SVI, which passes them to the
            # optimiser
            with torch.no_grad():
                guide(*args, **kwargs)
        layout = self._layout(model, guide)
        try:
            with torch.no_grad():
                mean, precision = adapter.natural(layout)
            densities = self._densities(model, guide, layout, args, kwargs, mean)
            try:
                grad, hess, log_p = self._expectations(densities, mean, precision, adapter.diagonal)
            except _NotFinite:
                sites = _non_finite_sites(model, layout, args, kwargs, mean)
                raise ValueError(
                    "NaturalGradient: the gradient or Hessian of log p is not finite at the draws of q"
                    + (f"; sites whose log density is not finite at q's mean: {sites}" if sites else "")
                ) from None
            if self.num_samples > 0:
                loss = -(log_p.mean() + _entropy(precision, adapter.diagonal)).item()
        except torch.linalg.LinAlgError as error:  # a covariance too ill-conditioned to factorise
            raise ValueError(
                f"NaturalGradient: the guide's covariance is numerically singular ({error}); "
                "the curvature estimates were too noisy for the step size: lower lr, raise "
                "num_samples or use curvature='hessian'"
            ) from error
        self.record = StepRecord(
            guide, mean, precision, grad, hess, adapter.diagonal, float(loss), layout, adapter
        )
        return loss

    # ------------------------------------------------------------ estimates
    def _draws(self, mean, precision, diagonal):
        """``(K, d)`` draws of q (the mean when ``num_samples == 0``), the
        second half mirroring the first when ``antithetic``."""
        if self.num_samples == 0:
            return mean.unsqueeze(0)
        K = self.num_samples
        half = K // 2 if self.antithetic else K
        eps = torch.randn((half,) + mean.shape, dtype=mean.dtype, device=mean.device)
        if self.antithetic:
            eps = torch.cat([eps, -eps])
        if diagonal:
            return mean + eps / precision.sqrt()
        L = torch.linalg.cholesky(precision)
        return mean + torch.linalg.solve_triangular(L.T, eps.T, upper=True).T

    def _expectations(self, densities, mean, precision, diagonal):
        """Monte Carlo averages of ∇ log p and of its curvature (the Hessian,
        or its Bonnet–Price estimate ``S (x − m) ∇ log p(x)ᵀ``) over draws,
        and log p at each draw."""
        points = self._draws(mean, precision, diagonal)
        log_density, batched = densities
        with torch.enable_grad():
            x = points.detach().clone().requires_grad_(True)
            values = batched(x) if batched is not None else torch.stack([log_density(p) for p in x.unbind()])
            (grads,) = torch.autograd.grad(values.sum(), x, create_graph=self.curvature == "hessian")
            if self.curvature == "hessian":
                # the Hessian of the sum is block diagonal in the points: the
                # j-th unit direction at every point gives row j of each
                d = mean.shape[-1]
                directions = torch.eye(d, dtype=mean.dtype, device=mean.device)
                directions = directions.unsqueeze(1).expand(d, len(points), d)
                rows = hessian_rows(grads, x, directions)
                hessians = rows.transpose(0, 1)  # (K, d, d)
        grads = grads.detach()
        if self.curvature == "hessian":
            hess = hessians.diagonal(dim1=-2, dim2=-1) if diagonal else symmetrize(hessians)
        else:
            delta = points - mean
            if diagonal:
                hess = precision * delta * grads
            else:
                outer = (delta @ precision).unsqueeze(-1) * grads.unsqueeze(-2)  # S δ ∇ᵀ
                hess = symmetrize(outer)
        grad, hess = grads.mean(0), hess.mean(0)
        if not (torch.isfinite(grad).all() and torch.isfinite(hess).all()):
            raise _NotFinite
        return grad, hess, values.detach()

    def _densities(self, model, guide, layout, args, kwargs, mean):
        """``(log_density, batched)``: the per-point log density, and the
        vectorised one over many points when the model broadcasts under a
        plate of points (checked once per guide against the per-point one;
        ``None`` when it does not, so that draws are evaluated one by one)."""
        log_density = flat_log_density(model, layout, args, kwargs)
        if self.num_samples <= 1:
            return log_density, None
        state = self._layouts[guide]
        if state.get("batched_ok") is False:
            return log_density, None
        if math.isinf(self.max_plate_nesting):  # guessed by Trace_ELBO's first loss call
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        batched = batched_log_density(model, layout, args, kwargs, self.max_plate_nesting)
        if "batched_ok" not in state:
            generator = torch.Generator(device=mean.device).manual_seed(0)
            probe = mean + 0.1 * torch.randn(
                (2,) + mean.shape, generator=generator, dtype=mean.dtype, device=mean.device
            )
            try:
                with torch.no_grad():
                    ok = torch.allclose(
                        batched(probe), torch.stack([log_density(p) for p in probe]), rtol=1e-6, atol=1e-6
                    )
            except Exception:  # a model that does not broadcast over the points
                ok = False
            state["batched_ok"] = ok
            if not ok:
                return log_density, None
        return log_density, batched

    def _layout(self, model, guide):
        state = self._layouts.get(guide)
        if state is None or state["model"] is not model:
            state = {"model": model, "layout": FlatLayout.from_trace(guide.prototype_trace)}
            self._layouts[guide] = state
        return state["layout"]


class _NotFinite(Exception):
    """The expected gradient or Hessian is not finite (named by the loss)."""


def _non_finite_sites(model, layout, args, kwargs, x):
    """The names of the model's sample sites (observed ones included) whose
    log density is not finite at the flat point ``x``."""
    transforms = {site.name: site.transform for site in layout.sites}
    values = {name: transforms[name](u) for name, u in layout.unpack(x).items()}
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
        return [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
            and not site_is_subsample(site)
            and not torch.isfinite(site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"]).sum())
        ]


class _MoveTo(torch.optim.Optimizer):
    """The torch optimiser :class:`NaturalGradient` gives
    :class:`~pyro.optim.PyroOptim` (one per parameter): ``step(targets=...)``
    moves each of its parameters to the value the rule chose for it and
    counts its steps (``state[p]["step"]``, checkpointed by ``get_state``)."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, targets: dict | None = None) -> None:
        """Set each parameter to ``targets[parameter]`` (left as it is when
        absent). ``closure`` is not supported (the step needs no loss)."""
        if closure is not None or targets is None:
            raise ValueError(f"this optimiser is driven by NaturalGradient, not called directly: {_USAGE}")
        for group in self.param_groups:
            for p in group["params"]:
                if p in targets:
                    p.copy_(targets[p])
                    state = self.state[p]
                    state["step"] = state.get("step", 0) + 1


class NaturalGradient(pyro.optim.PyroOptim):
    r"""The Bayesian learning rule: a Pyro optimiser that comes with its own loss.

    Each step moves q's precision towards the expected negative Hessian of
    log p under q and its mean by the precision-preconditioned expected
    gradient (see the module docstring). ``optim.loss`` (a
    :class:`NaturalGradientLoss`) estimates E_q[∇ log p] and E_q[∇² log p]
    from draws of q during ``loss_and_grads``, records them and returns
    ``-ELBO``; ``optim(params)`` -- what :class:`~pyro.infer.SVI` calls
    next -- forms the new mean and precision from that record and moves the
    guide's parameters there. Run the two together:
    ``SVI(model, guide, optim, optim.loss)``, or :func:`curvi.fit` with
    ``optim=optim, loss=optim.loss``.

    **Why a PyroOptim with its own loss.** The step needs more than a
    gradient -- the curvature of log p at the draws -- and Pyro's optimiser
    interface, ``optim(params)``, carries only the parameters and their
    ``.grad``. A loss alone that wrote the step into ``.grad`` (this class's
    earlier form) was an optimiser in disguise: it was only right under
    ``SGD`` with ``lr=1``, silently wrong under Adam or gradient clipping,
    and held no optimiser state to checkpoint. As a
    :class:`~pyro.optim.PyroOptim` subclass the step is taken where Pyro
    takes steps, by a torch optimiser per parameter that PyroOptim creates
    and whose state ``get_state`` / ``set_state`` save and restore (so
    :func:`curvi.fit` resumes bitwise); the curvature travels from loss to
    optimiser through the loss object the optimiser owns, and the loss
    overrides ``loss_and_grads`` (not ``_differentiable_loss_particle``,
    whose scalar autograd cannot carry a Hessian). Passing this object as
    SVI's *loss* raises a :class:`TypeError` that names the usage, and using
    it with another loss a :class:`ValueError`.

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.infer import SVI
        from pyro.infer.autoguide import AutoMultivariateNormal
        from curvi import NaturalGradient

        def model(x, obs):
            w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            with pyro.plate("data", len(obs)):
                pyro.sample("obs", dist.Bernoulli(logits=(w * x).sum(-1)), obs=obs)

        x, obs = torch.randn(100, 2), torch.randint(0, 2, (100,)).float()
        guide = AutoMultivariateNormal(model)
        optim = NaturalGradient(lr=0.5, num_samples=8)
        svi = SVI(model, guide, optim, optim.loss)
        for _ in range(20):
            svi.step(x, obs)
        optim.num_iterations, optim.get_state()  # 20 steps; per-parameter state for checkpoints

    :param float lr: the step size ρ in (0, 1].
    :param int num_samples: draws of q per expectation (0: at the mean).
    :param str curvature: ``"hessian"`` -- the exact Hessian at each draw
        (``d`` Hessian-vector products, batched over the draws), or
        ``"gradient"`` -- its Bonnet–Price estimate ``S (x − m) ∇ log p(x)ᵀ``
        (symmetrised), unbiased for ``E_q[∇² log p]`` from the gradients
        alone, so a step costs what a gradient step costs; noisier, so it
        wants a smaller ``lr`` (the correction keeps S positive definite).
    :param bool antithetic: draw an even ``num_samples`` in mirrored pairs
        ``m ± δ``, which cancels the gradient's noise exactly where log p is
        quadratic (ignored for odd ``num_samples``).
    :param float damping: added to the diagonal of the expected curvature.
    :param str correction: ``"auto"``, ``"always"`` or ``"never"`` — when to
        apply the improved rule's positive-definite correction.
    :param int elbo_particles: particles of the returned ELBO estimate when
        ``num_samples=0`` (the step's draws give it otherwise).
    :raises TypeError: for an option of the wrong type.
    :raises ValueError: for an option out of range.
    """

    def __init__(
        self,
        lr: float = 0.5,
        num_samples: int = 1,
        *,
        curvature: str = "hessian",
        antithetic: bool = True,
        damping: float = 0.0,
        correction: str = "auto",
        elbo_particles: int = 1,
    ) -> None:
        _check_real("lr", lr)
        if not 0 < lr <= 1:
            raise ValueError(f"lr must be in (0, 1], got {lr!r}")
        _check_real("damping", damping)
        if not 0 <= damping < math.inf:
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        _check_choice("correction", correction, ("auto", "always", "never"))
        loss = NaturalGradientLoss(
            num_samples, curvature=curvature, antithetic=antithetic, elbo_particles=elbo_particles
        )
        super().__init__(_MoveTo, {})
        self.lr, self.damping, self.correction = float(lr), float(damping), correction
        #: the loss to run with this optimiser: ``SVI(model, guide, optim, optim.loss)``
        self.loss: NaturalGradientLoss = loss
        #: steps taken (restored by ``set_state``)
        self.num_iterations = 0
        #: how many steps used the positive-definite correction (restored by ``set_state``)
        self.num_corrected = 0

    @property
    def num_samples(self) -> int:
        """Draws of q per step (the loss's)."""
        return self.loss.num_samples

    @property
    def curvature(self) -> str:
        """``"hessian"`` or ``"gradient"`` (the loss's)."""
        return self.loss.curvature

    @property
    def antithetic(self) -> bool:
        """Whether the draws come in mirrored pairs (the loss's)."""
        return self.loss.antithetic

    # ------------------------------------------------------------ Pyro API
    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """Take the step that ``self.loss`` recorded in its last
        ``loss_and_grads``: the new mean and precision by :meth:`update`,
        written into the guide's parameters by PyroOptim's per-parameter
        optimisers. ``params`` are the parameters SVI saw (the guide's)."""
        if callable(params) or isinstance(params, torch.Tensor):
            raise TypeError(
                "NaturalGradient is a Pyro optimiser that brings its own loss, and was called as a loss "
                f"(passed as SVI's or curvi.fit's loss=); use {_USAGE}"
            )
        params = list(params)
        record, self.loss.record = self.loss.record, None
        if record is None:
            raise ValueError(
                "NaturalGradient takes its step from what its own loss measured, and that loss has not "
                f"run since the last step (SVI or curvi.fit was given another loss); use {_USAGE}"
            )
        with torch.no_grad():
            new_mean, new_precision, corrected = self._rule(
                record.mean, record.precision, record.grad, record.hess, record.diagonal
            )
            try:
                targets = record.adapter.targets(record.layout, new_mean, new_precision)
            except torch.linalg.LinAlgError as error:
                raise ValueError(
                    f"NaturalGradient: the new covariance is numerically singular ({error}); the "
                    f"curvature estimates are too noisy for lr={self.lr:g}: lower lr, raise "
                    "num_samples or use curvature='hessian'"
                ) from error
        given, ours = set(params), {p for _, p, _ in targets}
        missing = [name for name, p, _ in targets if p not in given]
        if missing:
            raise ValueError(f"NaturalGradient: the guide's parameters {missing} were not among params")
        store = pyro.get_param_store()
        others = [store.param_name(p) or "<unnamed>" for p in params if p not in ours]
        if others:
            raise ValueError(
                f"NaturalGradient steps only the Gaussian guide's parameters, and the loss also used "
                f"{others} (pyro.param sites of the model): make them latent or fit them separately"
            )
        super().__call__(params, targets={p: value for _, p, value in targets})
        self.num_iterations += 1
        self.num_corrected += int(corrected)

    def get_state(self) -> dict:
        """PyroOptim's per-parameter state (by parameter name) and the step
        counters, for checkpoints (:func:`curvi.fit` saves it)."""
        state = super().get_state()
        state[_STATE_KEY] = {"num_iterations": self.num_iterations, "num_corrected": self.num_corrected}
        return state

    def set_state(self, state_dict: dict) -> None:
        """Restore what :meth:`get_state` returned (the per-parameter state
        is taken up when each parameter is next stepped, as in PyroOptim)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from get_state(), got {type(state_dict).__name__}")
        state = dict(state_dict)
        counters = state.pop(_STATE_KEY, None)
        if counters is not None:
            self.num_iterations = int(counters["num_iterations"])
            self.num_corrected = int(counters["num_corrected"])
        super().set_state(state)

    # ------------------------------------------------------------ the rule
    def update(
        self,
        mean: torch.Tensor,
        precision: torch.Tensor,
        grad: torch.Tensor,
        hess: torch.Tensor,
        *,
        diagonal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the rule from ``(mean, precision)`` given the expected
        gradient ``grad`` and Hessian ``hess`` of log p (diagonals when
        ``diagonal``). Returns ``(new_mean, new_precision)``; counts a
        corrected step in ``num_corrected``."""
        new_mean, new_precision, corrected = self._rule(mean, precision, grad, hess, diagonal)
        self.num_corrected += int(corrected)
        return new_mean, new_precision

    def _rule(self, mean, precision, grad, hess, diagonal):
        rho = self.lr
        target = -hess + self.damping * (
            1.0 if diagonal else torch.eye(len(mean), dtype=mean.dtype, device=mean.device)
        )
        plain = (1 - rho) * precision + rho * target
        plain_ok = _is_pd(plain, diagonal)
        if self.correction == "never" and not plain_ok:
            raise ValueError(
                "NaturalGradient: the updated precision is not positive definite (log p is not "
                "concave over q); use correction='auto' or a smaller lr"
            )
        use_correction = self.correction == "always" or (self.correction == "auto" and not plain_ok)
        if use_correction:
            # S + ρG + ρ²/2 G S⁻¹ G = ½ S + ½ (S + ρG) S⁻¹ (S + ρG): written as
            # ½ S + ½ BᵀB with B = L⁻¹ (S + ρG), S = L Lᵀ, it is positive
            # definite in floating point too, however large G is
            step = precision + rho * (target - precision)
            if diagonal:
                new = 0.5 * precision + 0.5 * step * step / precision
            else:
                B = torch.linalg.solve_triangular(torch.linalg.cholesky(precision), step, upper=False)
                new = 0.5 * precision + 0.5 * B.T @ B
                new = symmetrize(new)
        else:
            new = plain
        if not (torch.isfinite(new).all() and _is_pd(new, diagonal)):
            raise ValueError(
                f"NaturalGradient: the updated precision is not numerically positive definite "
                f"(curvature estimates too large or noisy for lr={self.lr:g}); lower lr, raise "
                "num_samples or use curvature='hessian'"
            )
        step = grad / new if diagonal else torch.linalg.solve(new, grad)
        return mean + rho * step, new, use_correction


# ------------------------------------------------------------ guide adapters
def _adapter(guide):
    if isinstance(guide, AutoMultivariateNormal):
        return _FullAdapter(guide)
    if isinstance(guide, (AutoNormal, AutoDiagonalNormal)):
        return _DiagonalAdapter(guide)
    raise TypeError(
        "NaturalGradient updates AutoMultivariateNormal, AutoNormal and AutoDiagonalNormal "
        f"guides; got {type(guide).__name__}"
    )


class _FullAdapter:
    diagonal = False

    def __init__(self, guide):
        self.guide = guide

    def natural(self, layout):
        q = gaussian_view(self.guide, layout)
        self.perm = q.perm
        mean, cov = q.moments()
        L = cov.factor
        precision = torch.cholesky_inverse(torch.linalg.cholesky(L @ L.T))
        return mean, symmetrize(precision)

    def targets(self, layout, mean, precision):
        g = self.guide
        inverse = torch.empty_like(self.perm)
        inverse[self.perm] = torch.arange(len(self.perm), device=self.perm.device)
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        L = torch.linalg.cholesky(cov[inverse][:, inverse])
        scale = L.diagonal()
        return [
            _target(g, "loc", mean[inverse]),
            _target(g, "scale", scale),
            _target(g, "scale_tril", L / scale.unsqueeze(-1)),
        ]


class _DiagonalAdapter:
    diagonal = True

    def __init__(self, guide):
        self.guide = guide

    def natural(self, layout):
        q = gaussian_view(self.guide, layout)
        self.view = q
        mean, cov = q.moments()
        return mean, 1.0 / cov.var

    def targets(self, layout, mean, precision):
        scale = precision.rsqrt()
        g = self.guide
        if isinstance(g, AutoDiagonalNormal):
            perm = self.view.perm
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm), device=perm.device)
            return [_target(g, "loc", mean[inverse]), _target(g, "scale", scale[inverse])]
        locs, scales = layout.unpack(mean), layout.unpack(scale)
        return [
            t
            for name in locs
            for t in (_target(g.locs, name, locs[name]), _target(g.scales, name, scales[name]))
        ]


def _target(module, name, value):
    """``(label, parameter, new value)``: the unconstrained parameter behind
    ``module.<name>`` and the unconstrained value that makes ``module.<name>``
    equal ``value``."""
    unconstrained = module._parameters.get(name + "_unconstrained")
    if unconstrained is None:
        unconstrained = module._parameters[name]
        target = value.detach()
    else:
        constraint = module._pyro_params[name][0]
        target = torch.distributions.transform_to(constraint).inv(value.detach())
    if not torch.isfinite(target).all():
        raise ValueError(f"NaturalGradient: the new value of '{name}' is not finite")
    return name, unconstrained, target.reshape(unconstrained.shape).to(unconstrained.dtype)


def _entropy(precision, diagonal):
    """Entropy of a Gaussian with this precision (a diagonal one: its diagonal)."""
    d = precision.shape[-1]
    log_det = (
        precision.log().sum() if diagonal else 2 * torch.linalg.cholesky(precision).diagonal().log().sum()
    )
    return 0.5 * d * (1.0 + math.log(2 * math.pi)) - 0.5 * log_det


def _is_pd(matrix, diagonal):
    if diagonal:
        return bool((matrix > 0).all())
    return torch.linalg.cholesky_ex(matrix).info.item() == 0


# ------------------------------------------------------------ option checks
def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def _check_int(name, value, least):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
