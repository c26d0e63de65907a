"""Laplace guides: Gaussian guides whose precision is the curvature of log p.

Both guides are Pyro :class:`~pyro.infer.autoguide.AutoGuide` s over the
unconstrained coordinates of a :class:`~curvi.model.ModelView`: globals θ
and per-unit latents yᵢ in one unit plate. The guide is

    q(θ, y) = N((θ̂, ŷ), P⁻¹),   P = repair(−∇² log p(θ̂, ŷ)),

sampled in its arrowhead factorisation (docs/design.md §2) as two auxiliary
sites, ``q(θ) = N(θ̂, S⁻¹)`` and, inside the unit plate,
``q(yᵢ | θ) = N(ŷᵢ − Mᵢ(θ − θ̂), Dᵢ⁻¹)`` with ``Mᵢ = Dᵢ⁻¹Bᵢ``, followed by a
``Delta`` site per model site that carries the constraint Jacobian. Pyro
then handles the particle plate of ``vectorize_particles``, the scaling of
subsampled plates and ``Predictive``.

Each call computes one :class:`~curvi.posterior.LaplaceGaussian` -- θ̂, ŷ
and the :class:`~curvi.arrowhead.ArrowheadPrecision` of q -- samples both
sites from its Cholesky factors, and publishes it in the ``infer`` dict of
the global site under the key ``"laplace_gaussian"``; whoever needs the
guide's Gaussian (an estimator, an optimiser) reads it from the guide trace
with :func:`laplace_gaussian`.

* :class:`LaplaceGuide` learns θ̂ and every ŷᵢ.
* :class:`AmortizedLaplaceGuide` learns θ̂ only; ŷ(θ̂) are the units'
  conditional modes, and the ELBO gradient is the total derivative through
  them while P is the partial Hessian at (θ̂, ŷ(θ̂)) (docs/design.md §4.4).

**Subsampling.** Under ``pyro.plate(unit_plate, N, subsample_size=n)`` the
Hessian is taken on the n units of the batch: each unit's blocks are exact,
and the Schur complement S of the batch is an unbiased estimate of the full
one. q(θ) uses a running average of these estimates (its value) with the
batch estimate's derivative, so each step's ELBO estimate is unbiased for
the current guide.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import constraints

from . import distributed
from .arrowhead import ArrowheadPrecision, PrecisionCholeskyNormal
from .checks import check_count
from .factors import unit_plates
from .hessian import structured_hessian
from .hidden_sites import SummingOutELBO
from .laplace_newton import LaplaceNewton
from .marginal import _check_quadrature, _laplace_draws, laplace_hessian, laplace_mode
from .model import ModelView
from .modes import NoLaplaceApproximation, implicit_modes, solve_modes, warn_unconverged
from .particles import CollapsedELBO
from .posterior import (
    INFER_KEY,
    UNITS_KEY,
    ArrowheadNormal,
    LaplaceGaussian,
    LaplacePosterior,
    laplace_gaussian,
)
from .quadrature import laplace_bias, quadrature_log_marginal
from .repair import Jitter, SpectralRepair, as_repair

__all__ = ["AmortizedLaplaceGuide", "INFER_KEY", "LaplaceGuide", "LaplaceGuideBase", "laplace_gaussian"]


class LaplaceGuideBase(AutoGuide):
    """The Laplace guides' shared machinery: set-up, the precision at the
    mean, and sampling from the call's :class:`~curvi.posterior.LaplaceGaussian`.

    Subclasses set their parameters in :meth:`_init_locs` and give the
    (differentiable) mean in :meth:`_locs`. A type to check against, not a
    guide to use: see :class:`LaplaceGuide` and :class:`AmortizedLaplaceGuide`.
    """

    _factor_guide = None  # the name of the subclass's guide for several grouping factors

    def __new__(cls, model: Callable = None, *args, unit_plate=None, **kwargs):
        # several grouping factors: the subclass's guide with the sparse Hessian
        if unit_plates(unit_plate) is None:
            return super().__new__(cls)
        if cls._factor_guide is None:
            raise ValueError(f"{cls.__name__} takes one unit plate, got {unit_plate!r}")
        from . import factor_guide

        Guide = getattr(factor_guide, cls._factor_guide)
        accepted = sorted(set(inspect.signature(Guide).parameters) - {"model", "unit_plate"})
        refused = sorted(set(kwargs) - set(accepted))
        if refused:
            raise ValueError(
                f"{cls.__name__} with several grouping factors (unit_plate={unit_plate!r}) "
                f"takes only {accepted}; got {refused}"
            )
        return Guide(model, unit_plate=unit_plate, **kwargs)

    def __init__(
        self,
        model: Callable,
        *,
        unit_plate: str | None = None,
        repair: SpectralRepair | Jitter | str = "softabs",
        init_loc_fn: Callable[[Message], torch.Tensor] = init_to_median,
        create_plates: Callable | None = None,
        check_structure: bool = True,
        running_weight: float = 0.1,
        init_to_mode: bool = True,
    ):
        if isinstance(unit_plate, (tuple, list)) and len(unit_plate) == 1:
            unit_plate = unit_plate[0]  # one grouping factor: the arrowhead path
        if unit_plate is not None and not isinstance(unit_plate, str):
            raise ValueError(f"unit_plate must be the name of a pyro.plate or None, got {unit_plate!r}")
        if repair is None:
            raise ValueError(
                "repair=None would fail on the first indefinite Hessian; pass 'softabs', "
                "'softplus', 'clip', 'jitter' or a repair object"
            )
        if not 0 < running_weight <= 1:
            raise ValueError(f"running_weight must be in (0, 1], got {running_weight!r}")
        self.unit_plate = unit_plate
        self.repair = as_repair(repair)
        self.init_loc_fn = init_loc_fn
        self.check_structure = check_structure
        self.running_weight = running_weight
        self.init_to_mode = init_to_mode
        super().__init__(model, create_plates=create_plates)

    # ----------------------------------------------------------------- set-up
    @torch.enable_grad()  # the initial mode solves differentiate, even from a read-out under no_grad
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.view = ModelView(
            self.model,
            *args,
            unit_plate=self.unit_plate,
            init_loc_fn=self.init_loc_fn,
            check_structure=self.check_structure,
            **kwargs,
        )
        view = self.view
        if view.global_dim == 0:
            raise ValueError(
                f"{type(self).__name__} needs at least one global latent site outside plate "
                f"'{self.unit_plate}'; this model has none"
            )
        if self.unit_plate is None:
            _hint_unit_plate(self.prototype_trace, view.global_dim)
        if view.hidden.conditioned and self.master is None:
            raise ValueError(
                f"sites {list(view.hidden.conditioned)} are hidden from {type(self).__name__} by "
                "poutine.block and cannot be summed out (they are not enumerable discrete sites); "
                "its Laplace approximation needs their values: give them to another guide placed "
                "before this one in an AutoGuideList, or let this guide own them"
            )
        self._frames = {
            name: [f for f in self.prototype_trace.nodes[name]["cond_indep_stack"] if f.vectorized]
            for name in view.global_sites + view.local_sites
        }
        self._event_dims = {
            name: self.prototype_trace.nodes[name]["fn"].event_dim
            for name in view.global_sites + view.local_sites
        }
        # running average of the Schur complement under subsampling (buffers,
        # so checkpoints of a fit carry them)
        p = view.global_dim
        self.register_buffer("running_schur", view.init_theta.new_zeros(p, p))
        self.register_buffer("running_count", torch.zeros((), dtype=torch.long))
        self._init_locs(view, self._initial_theta(view))
        self._check_stored_shapes(view)
        # shapes of data known to hold the set-up units (see _view_and_plates)
        self._same_units = {_data_signature(args, kwargs)}

    def default_loss(self, *args, **kwargs) -> pyro.infer.ELBO | None:
        """The loss :func:`curvi.fit` uses with this guide when neither it nor
        the optimiser gives one: when the guide sums hidden discrete sites out
        of its density (``poutine.block(model, hide=[...])``), Pyro's
        ``TraceEnum_ELBO`` summing the same sites out of the model
        (:class:`~curvi.hidden_sites.SummingOutELBO`); else None (Pyro's
        ``Trace_ELBO``). Sets the guide up from ``*args, **kwargs`` if needed.

        Usage::

            import pyro, pyro.distributions as dist
            import pyro.poutine as poutine

            def model(obs):
                mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
                with pyro.plate("data", len(obs)):
                    c = pyro.sample("c", dist.Bernoulli(0.2))
                    pyro.sample("z", dist.Normal(mu * (1 - c), 1.0 + 2 * c), obs=obs)

            guide = LaplaceGuide(poutine.block(model, hide=["c"]))
            type(guide.default_loss(torch.randn(5))).__name__   # 'SummingOutELBO'
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not self.view.hidden.enumerated:
            return None
        return SummingOutELBO(self.view.hidden, max_plate_nesting=self.view.max_plate_nesting)

    def _apply(self, fn, recurse=True):
        """``guide.to(dtype or device)`` (and ``double()``, ``cuda()``, ...):
        the parameters and buffers as for any module, and the tensors of the
        guide's view of the model with them."""
        super()._apply(fn, recurse)
        if getattr(self, "view", None) is not None:
            self.view = self.view.apply_to_tensors(fn)
        self._other_data = None  # a view of other data is re-made on its next use
        return self

    def _check_stored_shapes(self, view):
        """Pyro's param store keeps parameters by name across guides: one left
        by an earlier guide of another model would be used silently."""
        expected = {"loc_global": (view.global_dim,), "loc_local": (view.num_units, view.local_dim)}
        for name, shape in expected.items():
            if name in self._pyro_params and tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Pyro's param store already holds '{self._pyro_name}.{name}' with shape "
                    f"{tuple(getattr(self, name).shape)}, not {shape} as this model needs (left by an "
                    "earlier guide of the same class); call pyro.clear_param_store() first"
                )

    def _initial_theta(self, view):
        """The mode of the Laplace marginal of θ when ``init_to_mode`` (and the
        unit plate does not subsample), else the init strategy's point."""
        if not self.init_to_mode or view.unit_indices is not None:
            return view.init_theta
        return start_at_mode(view, stacklevel=4)

    def _init_locs(self, view, theta):
        raise NotImplementedError

    def _locs(self, view, units):
        """The mean (θ̂, ŷ) for the rows ``units`` (None: all units)."""
        raise NotImplementedError

    def _all_units_modes(self, view, theta):
        """Conditional modes of every unit at ``theta`` (a set-up step)."""
        y = view.init_y.new_zeros(view.num_units, view.local_dim)
        for units, keep in _unit_batches(view):
            y0 = view.init_y if units is None else y[units]
            result = solve_modes(view, theta, y0, units=units)
            warn_unconverged(result, units=units, stacklevel=4)
            y = _scatter(y, units, keep, result.y)
        return y

    # ------------------------------------------------------------ precision
    def _gaussian(self, view, theta_hat, y_hat, units, subsampled):
        """The call's :class:`LaplaceGaussian`: the batch's repaired precision
        ``P`` (:meth:`_precision`) with q(θ)'s precision ``S``
        (:meth:`_global_precision`) as its Schur complement and the cross
        blocks of one unit's own curvature. Under full batches and
        ``S = P.schur`` this is ``P`` itself; otherwise ``P``'s unit factors
        are reused and only ``S`` is factored."""
        P = self._precision(view, theta_hat, y_hat, units)
        S = self._global_precision(P, subsampled)
        s = view.unit_scale(y_hat.shape[0])
        Q = P if S is P.schur and s == 1 else P.with_schur(S, cross_scale=1 / math.sqrt(s))
        return LaplaceGaussian(theta_hat, y_hat, Q, subsampled=subsampled, units=units, epoch=self._epoch())

    def _epoch(self):
        """How often the rule that computes S from θ̂ has changed (see
        :class:`~curvi.posterior.LaplaceGaussian`); 0 when it never does."""
        return 0

    def _precision(self, view, theta_hat, y_hat, units):
        """The repaired arrowhead precision at the mean, from the Hessian of the
        (possibly subsampled) log joint: unit blocks are rescaled to one
        unit's own curvature, the cross blocks so that the Schur complement
        is the batch's unbiased estimate of the full one."""
        s = view.unit_scale(y_hat.shape[0])
        H = structured_hessian(view, theta_hat, y_hat, units=units, create_graph=torch.is_grad_enabled())
        reduce = distributed.schur_sum if distributed.is_sharded() else None
        return ArrowheadPrecision(-H.A, -H.B / math.sqrt(s), -H.D / s, repair=self.repair, reduce=reduce)

    def _global_precision(self, P, subsampled):
        """S for q(θ): the batch's own under full batches; under subsampling a
        running average of batch estimates carrying the batch's derivative."""
        S = P.schur
        if not subsampled:
            return S
        estimate = S.detach()
        if not torch.is_grad_enabled():  # read-outs (Predictive) leave the average alone
            return self.running_schur if self.running_count > 0 else S
        w = 1.0 if self.running_count == 0 else self.running_weight
        self.running_schur = (1 - w) * self.running_schur + w * estimate
        self.running_count += 1
        return self.running_schur + (S - estimate)

    # -------------------------------------------------------------- forward
    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every latent site of the model from the guide.

        :return: a dict from site name to its sampled (constrained) value.
        """
        if any(isinstance(m, TraceMessenger) for m in _PYRO_STACK):  # an ELBO or Predictive records it
            distributed.check_guide_call(type(self).__name__)
        # the mode solve and the Hessian run on autograd: keep it on for them
        # even under torch.no_grad (e.g. a first call from Predictive)
        with torch.enable_grad():
            if self.prototype_trace is None:
                self._setup_prototype(*args, **kwargs)
            view, plates = self._view_and_plates(args, kwargs)
            if view.hidden.conditioned:
                view = view.with_conditions(self._values_drawn_by_other_guides(view))
            unit_plate = None if self.unit_plate is None else plates[self.unit_plate]
            subsampled = unit_plate is not None and unit_plate.subsample_size < view.num_units
            units = unit_plate.indices if subsampled or view.unit_indices is not None else None

            theta_hat, y_hat = self._locs(view, units)
            q = self._gaussian(view, theta_hat, y_hat, units, subsampled)

        theta = pyro.sample(
            f"_{self._pyro_name}_global",
            q.marginal_global(),
            infer={"is_auxiliary": True, INFER_KEY: q},
        )
        batch = theta.shape[:-1]  # the particle plates, e.g. (K, 1, 1)
        if unit_plate is None:  # no unit latents: q is the dense Gaussian of θ
            values = view.unpack_unconstrained(theta.reshape(-1, view.global_dim), y_hat.expand(1, 0, 0))
            return self._sample_sites(view, values, batch, plates)
        loc_y = q.conditional_mean(theta.reshape(-1, view.global_dim))  # ŷ − M(θ − θ̂): (B, n, k)
        # unit axis at the plate's dim, particle plates to its left
        n, k = y_hat.shape
        unit_shape = (n,) + (1,) * (-view.unit_dim - 1)
        outer = batch[: len(batch) + view.unit_dim] if batch else ()
        with unit_plate:
            y = pyro.sample(
                f"_{self._pyro_name}_local",
                PrecisionCholeskyNormal(
                    loc_y.reshape(outer + unit_shape + (k,)),
                    q.precision.cholesky.L_D.reshape(unit_shape + (k, k)),
                    validate_args=False,  # Cholesky factors: valid by construction
                ),
                # unit i's noise keyed by its global index (FixedNoise): the same
                # draws whichever process holds the unit
                infer={"is_auxiliary": True, UNITS_KEY: (_global_units(y_hat, units), self.unit_plate)},
            )
        y = self._unit_draws(view, theta.reshape(-1, view.global_dim), loc_y, q, y.reshape(-1, n, k))
        values = view.unpack_unconstrained(theta.reshape(-1, view.global_dim), y)
        return self._sample_sites(view, values, batch, plates)

    def _unit_draws(self, view, thetas, loc_y, q, y):
        """The units' values for the model sites: the Gaussian draws."""
        return y

    def _values_drawn_by_other_guides(self, view):
        """The values of the conditioned hidden sites, as the parts of the
        ``AutoGuideList`` before this guide have just drawn them (read from the
        trace being recorded)."""
        values = {}
        for name in view.hidden.conditioned:
            value = _recorded_value(name)
            if value is None and not any(isinstance(m, TraceMessenger) for m in _PYRO_STACK):
                raise ValueError(
                    f"site '{name}' is hidden from {type(self).__name__}, which conditions on the "
                    "value another guide draws; it reads that value from the trace being recorded, "
                    "and there is none: call the AutoGuideList under poutine.trace (as SVI, the "
                    "ELBOs and Predictive do), or use its median() for a point read-out"
                )
            if value is None:
                raise ValueError(
                    f"site '{name}' is hidden from {type(self).__name__}, which conditions on its "
                    "value, but no guide has drawn it in this run: in an AutoGuideList, place the "
                    "guide that owns it before this one"
                )
            values[name] = _one_value(name, value, view.conditions[name].shape)
        return values

    def _sample_sites(self, view, values, batch, plates):
        """A ``Delta`` site per model site at the constrained value, with the
        log density of the constraint Jacobian, aligned to the particle plates."""
        result = {}
        for layout in view.global_layout + view.local_layout:
            name, event_dim = layout.name, self._event_dims[layout.name]
            u = values[name]
            x = layout.transform(u)
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                log_density = layout.transform.inv.log_abs_det_jacobian(x, u)
                log_density = sum_rightmost(log_density, log_density.dim() - x.dim() + event_dim)
            site_shape = x.shape[1:]
            num_batch_dims = len(site_shape) - event_dim
            prefix = batch[: len(batch) - num_batch_dims] if batch else ()
            x = x.reshape(prefix + site_shape)
            if torch.is_tensor(log_density):
                log_density = log_density.reshape(prefix + site_shape[:num_batch_dims])
            with ExitStack() as stack:
                for frame in self._frames[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, dist.Delta(x, log_density=log_density, event_dim=event_dim))
        return result

    # ------------------------------------------------------------- read-outs
    @torch.no_grad()
    def get_posterior(self, *args, **kwargs) -> ArrowheadNormal:
        """The guide's Gaussian over all units as a torch ``Distribution`` over
        the flat unconstrained latent vector ``[θ, y.flatten()]``, as every
        Pyro autoguide's ``get_posterior`` returns one
        (:class:`~curvi.posterior.ArrowheadNormal`; its ``gaussian`` is the
        structured :class:`~curvi.posterior.LaplaceGaussian`). For draws and
        quantiles by site, see :meth:`laplace_posterior`."""
        return self.laplace_posterior(*args, **kwargs).gaussian.as_distribution()

    @torch.no_grad()
    def laplace_posterior(self, *args, **kwargs) -> LaplacePosterior:
        """The guide's Gaussian over all units, with the Laplace precision at
        its mean, read out by site (:class:`~curvi.posterior.LaplacePosterior`:
        ``sample``, ``quantiles``, ``marginal_sd``).

        Usage::

            import pyro, pyro.distributions as dist

            def model(obs):
                mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
                with pyro.plate("groups", obs.shape[0], dim=-2):
                    u = pyro.sample("u", dist.Normal(mu, 1.0))
                    with pyro.plate("obs", obs.shape[1], dim=-1):
                        pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

            obs = torch.randn(6, 3)
            post = AmortizedLaplaceGuide(model, unit_plate="groups").laplace_posterior(obs)
            post.sample(100)["u"].shape, post.marginal_sd()[0]   # (100, 6, 1), sd of mu

        A model whose unit plate subsamples is evaluated batch by batch over
        all its units (batches of its subsample size): the unit blocks are
        exact, and the global block is the average of the batches' unbiased
        estimates, exact when the subsample size divides the number of units.
        """
        view = self._read_out_view(args, kwargs)
        theta_hat = y = B = D = None
        A = []
        for units, keep in _unit_batches(view):
            theta_hat, y_hat = (t.detach() for t in self._locs(view, units))
            H = structured_hessian(view, theta_hat, y_hat, units=units)
            s = view.unit_scale(y_hat.shape[0])
            if y is None:
                y, B, D = (t.new_zeros((view.num_units,) + t.shape[1:]) for t in (y_hat, H.B, H.D))
            y, B, D = (_scatter(t, units, keep, v) for t, v in ((y, y_hat), (B, H.B / s), (D, H.D / s)))
            A.append(H.A)
        P = ArrowheadPrecision(-torch.stack(A).mean(0), -B, -D, repair=self.repair)
        return LaplacePosterior(view, theta_hat, y, self._read_out_precision(view, theta_hat, y, P))

    def _read_out_precision(self, view, theta_hat, y, P):
        """The precision the read-outs report (hook for a different q(θ))."""
        return P

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The posterior median of each latent site: the mean mapped to
        constrained space."""
        view = self._read_out_view(args, kwargs)
        y = view.init_y.new_zeros(view.num_units, view.local_dim)
        for units, keep in _unit_batches(view):
            theta_hat, y_hat = self._locs(view, units)
            y = _scatter(y, units, keep, y_hat.detach())
        return view.unpack(theta_hat.detach(), y)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Marginal quantiles of each latent site, with a leading dimension
        ``len(quantiles)``."""
        return self.laplace_posterior(*args, **kwargs).quantiles(quantiles)

    # ------------------------------------------------------------ other data
    def _view_and_plates(self, args, kwargs):
        """The view of the model on these data and the guide's plates for them.

        Data whose tensors have the shapes of the set-up data are taken to
        hold the same units (no extra work). Otherwise the model is traced
        once at a feasible point to count its units (remembered for data of
        those shapes): the same number goes on as usual, another goes to
        :meth:`_other_units`."""
        view = self.view.with_args(*args, **kwargs)
        signature = _data_signature(args, kwargs)
        if (args or kwargs) and signature not in self._same_units:
            num_units = self.view.num_units_of(*args, **kwargs)
            if num_units != self.view.num_units:
                return self._other_units(args, kwargs, signature, num_units)
            self._same_units.add(signature)
        return view, self._create_plates(*args, **kwargs)

    def _other_units(self, args, kwargs, signature, num_units):
        """A view and plates for data with another number of units: refused by
        a guide whose parameters are per unit."""
        raise ValueError(self._other_units_message(num_units))

    def _read_out_view(self, args, kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        view = self._view_and_plates(args, kwargs)[0] if args or kwargs else self.view
        if view.hidden.conditioned:
            view = view.with_conditions(self._medians_of_other_guides(view, args, kwargs))
        return view

    def _medians_of_other_guides(self, view, args, kwargs):
        """Read-outs condition the hidden sites on the medians of the guides
        of the ``AutoGuideList`` that own them."""
        values = {}
        for part in self.master() if self.master is not None else ():
            if part is self or part.prototype_trace is None:
                continue
            owned = [n for n in view.hidden.conditioned if n in part.prototype_trace.nodes]
            if owned:
                if not hasattr(part, "median"):
                    raise ValueError(
                        f"sites {owned} are conditioned on the guide that owns them, "
                        f"{type(part).__name__}, which has no median() to read them from"
                    )
                medians = part.median(*args, **kwargs)
                values.update({n: medians[n] for n in owned})
        missing = [n for n in view.hidden.conditioned if n not in values]
        if missing:
            raise ValueError(
                f"sites {missing} are hidden from {type(self).__name__} and no other guide of its "
                "AutoGuideList has been set up to give their values; call the whole guide once first"
            )
        return values

    def _other_units_message(self, num_units):
        return (
            f"{type(self).__name__} was set up for {self.view.num_units} units of plate "
            f"'{self.unit_plate}'; these data have {num_units}. Its per-unit means (loc_local) "
            "belong to the units it was fitted on and cannot describe others; fit a guide on "
            "these data, or use AmortizedLaplaceGuide, whose unit modes are solved from the data"
        )


def _data_signature(args, kwargs):
    """The shapes of the tensors among a model's arguments: data with the same
    signature hold the same units."""

    def shape(value):
        if isinstance(value, (bool, int, float, str, type(None))):
            return value
        if isinstance(value, (list, tuple)):
            return tuple(map(shape, value))
        if isinstance(value, dict):
            return tuple((k, shape(v)) for k, v in value.items())
        return type(value).__name__, tuple(getattr(value, "shape", ()))

    return shape(args), shape(kwargs)


def _recorded_value(name):
    """The value of sample site ``name`` in the innermost trace being recorded
    (``poutine.trace`` on Pyro's handler stack), or None."""
    for messenger in reversed(_PYRO_STACK):
        if isinstance(messenger, TraceMessenger) and name in messenger.trace.nodes:
            return messenger.trace.nodes[name]["value"]
    return None


def _one_value(name, value, shape):
    """The site's value without the particle dims of a vectorized ELBO: the
    guide conditions on one value per call. The value keeps its graph, so the
    ELBO's gradient with respect to the other guide's parameters includes
    their effect on this guide's mean and precision."""
    if value.dim() <= len(shape):
        return value.reshape(shape)
    flat = value.reshape((-1,) + tuple(shape))
    if not (flat.detach() == flat[:1].detach()).all():
        raise ValueError(
            f"site '{name}', which this Laplace guide conditions on, has a different value in each "
            "vectorized particle; the guide builds one Gaussian per call: use "
            "vectorize_particles=False (each particle is then a call), or a point-mass guide "
            "(AutoDelta) for that site"
        )
    return flat[0]


def start_at_mode(view, *, stacklevel: int = 2) -> torch.Tensor:
    """θ at the mode of the Laplace marginal, where a Laplace guide starts;
    ``view.init_theta`` (with a warning) when no mode is found from there --
    the log marginal is not finite, or L-BFGS stops without converging, as
    on an unbounded log density (an improper posterior), where it runs off
    to ``|θ| ~ 1e100`` with a finite value."""
    mode = laplace_mode(view, view.init_theta)
    if torch.isfinite(mode.log_marginal) and mode.converged:
        return mode.theta
    warnings.warn(
        "no mode of the Laplace marginal was found from the initial point (log marginal "
        f"{float(mode.log_marginal):.3g}, max |gradient| {mode.grad_norm:.3g} after "
        f"{mode.num_evaluations} evaluations; is the posterior proper?); starting from "
        "init_loc_fn's point instead",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    return view.init_theta


def _global_units(y_hat, units):
    """Global indices of the rows of ``y_hat``: the batch's units (or every
    unit of this process) offset by the process's first unit."""
    rows = torch.arange(y_hat.shape[0], device=y_hat.device) if units is None else units
    return rows + distributed.unit_offset()


def _hint_unit_plate(trace, num_coordinates):
    """Without a unit plate the precision is dense: say so when the model has a
    plate of latents large enough that the structured path would pay off."""
    if num_coordinates < 200:
        return
    plates = sorted(
        {
            f.name
            for site in trace.nodes.values()
            if site["type"] == "sample" and not site["is_observed"]
            for f in site["cond_indep_stack"]
            if f.vectorized
        }
    )
    if plates:
        warnings.warn(
            f"no unit_plate given: all {num_coordinates} latent coordinates are treated as "
            f"global, with a dense precision (cost grows with their square); if plate "
            f"{plates[0]!r} holds conditionally independent units, pass unit_plate={plates[0]!r}",
            UserWarning,
            stacklevel=5,
        )


def _unit_batches(view):
    """``(units, keep)`` pairs that together evaluate every unit once.

    ``[(None, None)]`` when the traced run held all units. Otherwise batches
    of the traced subsample's size (a model with a fixed ``subsample_size``
    accepts no other), the last one filled up with units from the start;
    ``keep`` marks each unit's first appearance.
    """
    if view.unit_indices is None:
        return [(None, None)]
    n, N = view.num_present_units, view.num_units
    all_units = torch.arange(N, device=view.device)
    batches = []
    for start in range(0, N, n):
        units = all_units[start : start + n]
        keep = torch.ones(n, dtype=torch.bool, device=view.device)
        if units.shape[0] < n:
            keep[units.shape[0] :] = False
            units = torch.cat([units, all_units[: n - units.shape[0]]])
        batches.append((units, keep))
    return batches


def _scatter(full, units, keep, values):
    """Write a batch's rows into the all-units tensor."""
    if units is None:
        return values
    full = full.clone()
    full[units[keep]] = values[keep]
    return full


class LaplaceGuide(LaplaceGuideBase):
    r"""Gaussian guide with a learned mean and the Laplace precision at it.

    Parameters ``loc_global`` (θ̂, shape ``(p,)``) and ``loc_local`` (ŷ,
    shape ``(N, k)``), unconstrained. Each draw is ``(θ̂, ŷ) + δ`` with
    ``δ ~ N(0, P⁻¹)``, ``P`` the repaired negative Hessian of the log joint at
    the mean from :func:`~curvi.hessian.structured_hessian`; the ELBO
    gradient flows through the mean and through ``P`` (third derivatives).
    ``loc_local`` starts at the units' conditional modes at the initial θ̂.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer import SVI, Trace_ELBO

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = pyro.sample("tau", dist.HalfNormal(2.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, tau))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Normal(u, 1.0), obs=obs)

        obs = torch.randn(8, 5) + 1.0
        guide = LaplaceGuide(model, unit_plate="groups")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for step in range(50):
            svi.step(obs)
        guide.median(obs)["mu"], guide.quantiles([0.05, 0.95], obs)["tau"]

    :param callable model: a Pyro model: with one unit plate, or none (then
        every latent is global and the precision dense); sites hidden with
        ``poutine.block`` are summed out (enumerable discrete sites) or
        conditioned on the values another guide of an ``AutoGuideList``
        draws (:mod:`curvi.hidden_sites`).
    :param str unit_plate: the name of the plate of the unit latents, or
        None (default) for a model without one.
    :param repair: positive-definite repair of the precision (see
        :func:`curvi.repair.as_repair`); default ``"softabs"``.
    :param callable init_loc_fn: Pyro init strategy for the initial point.
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    :param bool check_structure: check that units couple only through θ.
    :param float running_weight: under subsampling, the weight of each batch's
        estimate in the running average of the Schur complement.
    :param bool init_to_mode: start θ̂ at the mode of the Laplace marginal of
        θ (:func:`~curvi.marginal.laplace_mode`), where the Hessian is negative
        definite and the Laplace guide is what it is meant to be; else at
        ``init_loc_fn``'s point. Not available (ignored) when the unit plate
        subsamples.

    **References**

    [1] L. Tierney, J. B. Kadane (1986), "Accurate approximations for posterior
        moments and marginal densities", JASA 81.
    """

    _factor_guide = "FactorLaplaceGuide"  # its guide for several grouping factors

    def _init_locs(self, view, theta):
        if distributed.is_sharded():
            raise ValueError(
                "LaplaceGuide learns every unit's mean, which curvi does not share among processes; "
                "under torch.distributed use AmortizedLaplaceGuide (its only parameter is θ̂)"
            )
        self.loc_global = PyroParam(theta.clone(), constraints.real, event_dim=1)
        if view.num_units:
            self.loc_local = PyroParam(self._all_units_modes(view, theta), constraints.real, event_dim=2)

    def _locs(self, view, units):
        if not view.num_units:  # no unit plate: θ̂ is the whole mean
            return self.loc_global, view.init_y
        y = self.loc_local if units is None else self.loc_local[units]
        return self.loc_global, y


class AmortizedLaplaceGuide(LaplaceGuideBase):
    r"""Laplace guide whose only parameter is the global mode θ̂.

    ŷ(θ̂) are the units' conditional modes, ``argmax_y log p(θ̂, y, z)``,
    solved by batched Newton per unit (warm-started from the previous call)
    without a graph, then one differentiable Newton step so that the ELBO
    gradient with respect to θ̂ is the total derivative through ŷ(θ̂)
    (implicit function theorem) and through the precision. The precision is
    the *partial* Hessian at (θ̂, ŷ(θ̂)) (docs/design.md §4.4). Units whose solve does
    not converge are named in a :class:`~curvi.modes.ModeConvergenceWarning`.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer import SVI, Trace_ELBO

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = pyro.sample("tau", dist.HalfNormal(2.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, tau))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

        obs = torch.poisson(torch.full((8, 5), 3.0))
        guide = AmortizedLaplaceGuide(model, unit_plate="groups")
        elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        for step in range(50):
            svi.step(obs)
        guide.median(obs)["u"].shape  # (8, 1)

    On data with another number of units (new groups, prediction) the guide
    keeps the fitted q(θ) and solves each unit's mode and q(yᵢ | θ) from
    those data (docs/design.md §4.8).

    :param callable model, unit_plate: as in :class:`LaplaceGuide`.
    :param callable mode_fn: optional ``mode_fn(theta, *args, **kwargs) -> y``
        giving the conditional modes (unconstrained, ``(N, k)``) in closed
        form; they are checked (and refined) by Newton.
    :param repair: positive-definite repair of the precision.
    :param callable init_loc_fn: Pyro init strategy for the initial θ̂.
    :param float xtol: Newton step tolerance (default ``sqrt(eps)``; the
        final implicit step makes the modes accurate to about ``xtol²``).
    :param int max_iter: Newton iteration cap per call.
    :param str global_precision: the precision of q(θ) (docs/design.md
        §4.6). ``"joint"`` (default) or ``"marginal"``: the negative Hessian of the Laplace log
        marginal of θ at θ̂ (:func:`~curvi.marginal.laplace_hessian`), as TMB
        and INLA use for θ. ``"joint"``: the Schur complement of the partial
        Hessian of log p at (θ̂, ŷ(θ̂)). In hierarchies the joint curvature of
        a variance parameter can be far from its posterior width -- even
        indefinite at the optimum, then repaired -- while the marginal
        curvature tracks it (measured against NUTS in
        ``benchmarks/results/global_precision.md``); the ELBO, whose guide
        family cannot follow a funnel, may still prefer ``"joint"``. The
        marginal curvature costs ``2p`` extra gradients of the Laplace
        marginal, is recomputed at every call whose θ̂ has changed (within
        :meth:`holding_global_precision`, not at all) and is treated as a
        constant in the gradient; it needs every unit at each call, so it is
        not available under subsampling. The default is ``"joint"``: with
        ``"marginal"`` a weakly identified variance parameter gets a wide
        q(θ) whose draws meet q(yᵢ | θ)'s precision fixed at θ̂, and the
        ELBO's draws become heavy-tailed (docs/design.md §4.6).
    :param quadrature: train q(θ) on the *collapsed* ELBO
        ``E_q(θ)[log p̂_K(z, θ)] + H[q(θ)]``, the units integrated out by
        adaptive Gauss–Hermite quadrature with K nodes per dimension
        (:func:`~curvi.quadrature.quadrature_log_marginal`) instead of by the
        Gaussian q(y | θ): Laplace's bias on the globals (binary data, small
        groups) goes. ``"auto"``: K chosen to 0.01 nat at the initial θ̂ and
        held. :func:`curvi.fit`'s optimisers then use it; draws of the units
        still come from the Laplace conditional. Costs one mode solve and
        Kᵏ model evaluations per draw of θ; not with a subsampled plate.
        With ``global_precision="marginal"`` q(θ)'s precision is then the
        curvature of the quadrature log marginal.
    :param int resample_units: with ``quadrature=``, each draw of the units
        (``Predictive``, :meth:`forward`) is importance-resampled from this
        many proposals from the Laplace conditional by the weights
        ``p(yᵢ | θ, z) / q(yᵢ | θ)`` (unit i's own terms of the log density),
        one choice per unit: the units' draws then follow their skewed
        conditional rather than its Gaussian approximation (binary data, few
        observations per unit). Costs this many evaluations of the model per
        draw. Needs ``quadrature=``: the collapsed ELBO does not use the
        units' draws, while the joint ELBO needs their Gaussian density.
    :param create_plates, check_structure, running_weight, init_to_mode: as in
        :class:`LaplaceGuide`.
    """

    _factor_guide = (
        "AmortizedFactorLaplaceGuide"  # its guide for several grouping factors (curvi/factor_guide.py)
    )
    #: buffers with one row per unit (axis 0): checkpoints of a fit whose units
    #: are shared among processes hold them over every unit (curvi.distributed)
    unit_buffers = ("mode_cache", "mode_theta", "mode_slope")

    def __init__(
        self,
        model: Callable,
        *,
        unit_plate: str | None = None,
        mode_fn: Callable[..., torch.Tensor] | None = None,
        xtol: float | None = None,
        max_iter: int = 50,
        global_precision: str = "joint",
        quadrature: int | str | None = None,
        resample_units: int | None = None,
        **kwargs,
    ):
        if mode_fn is not None and not callable(mode_fn):
            raise ValueError(f"mode_fn must be callable, got {type(mode_fn).__name__}")
        if global_precision not in ("joint", "marginal"):
            raise ValueError(f"global_precision must be 'joint' or 'marginal', got {global_precision!r}")
        _check_quadrature(quadrature)
        if resample_units is not None:
            check_count("resample_units", resample_units, 1)
            if quadrature is None:
                raise ValueError(
                    "resample_units needs quadrature=: the joint ELBO uses the Gaussian density "
                    "of the units' draws, which resampled draws do not have"
                )
        self.resample_units = resample_units
        self.mode_fn, self.xtol, self.max_iter = mode_fn, xtol, max_iter
        self.global_precision = global_precision
        self.quadrature = quadrature
        self._held = 0  # depth of holding_global_precision()
        super().__init__(model, unit_plate=unit_plate, **kwargs)

    def default_optim(self, *args, **kwargs) -> pyro.optim.PyroOptim:
        """The optimiser :func:`curvi.fit` uses for this guide when given none:
        sample-average Newton on θ̂ (:class:`~curvi.laplace_newton.LaplaceNewton`
        with its defaults, docs/design.md §7). Its line search needs a
        deterministic ELBO under fixed noise, so every unit in each
        evaluation: when the unit plate subsamples, ``pyro.optim.Adam({"lr":
        0.01})`` instead. Sets the guide up from ``*args, **kwargs`` if it has
        not been called yet.

        Usage::

            import pyro, pyro.distributions as dist

            def model(obs):
                mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
                with pyro.plate("groups", obs.shape[0], dim=-2):
                    u = pyro.sample("u", dist.Normal(mu, 1.0))
                    with pyro.plate("obs", obs.shape[1], dim=-1):
                        pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

            obs = torch.randn(6, 3)
            guide = AmortizedLaplaceGuide(model, unit_plate="groups")
            type(guide.default_optim(obs)).__name__   # 'LaplaceNewton'
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.view.unit_indices is not None:
            return pyro.optim.Adam({"lr": 0.01})
        return LaplaceNewton()

    def _init_locs(self, view, theta):
        if self.global_precision == "marginal" and view.unit_indices is not None:
            raise ValueError(
                "global_precision='marginal' needs every unit at each step; it is not "
                f"available when plate '{self.unit_plate}' subsamples"
            )
        p = view.global_dim
        # the marginal curvature's correction to the joint Schur complement,
        # and the θ̂ it was computed at (count 0: not yet computed)
        self.register_buffer("marginal_correction", theta.new_zeros(p, p))
        self.register_buffer("marginal_theta", theta.clone())
        self.register_buffer("marginal_count", torch.zeros((), dtype=torch.long))
        self.loc_global = PyroParam(theta.clone(), constraints.real, event_dim=1)
        # warm start: each unit's last mode, the θ̂ it was solved at, and its
        # slope dŷ/dθ = -D⁻¹B there (a first-order predictor for the next θ̂)
        N, k, p = view.num_units, view.local_dim, view.global_dim
        self.register_buffer("mode_cache", self._all_units_modes(view, theta))
        self.register_buffer("mode_theta", theta.expand(N, p).clone())
        self.register_buffer("mode_slope", theta.new_zeros(N, k, p))
        if self.quadrature is not None:
            self._init_quadrature(view, theta)
        # q(θ)'s precision on the fitted data, and the θ̂ it belongs to: what
        # data with other units are read out with (count 0: not yet computed)
        self.register_buffer("fitted_precision", theta.new_zeros(p, p))
        self.register_buffer("fitted_theta", theta.clone())
        self.register_buffer("fitted_count", torch.zeros((), dtype=torch.long))
        self._other_data = None  # (signature, view, warm-start modes) of the last other data

    def check_fit(self, *args, **kwargs) -> str | None:
        """After :func:`curvi.fit`: when the units are integrated by Laplace's
        method (no ``quadrature=``), estimate how far that moves q(θ)
        (:func:`~curvi.quadrature.laplace_bias` with :attr:`bias_check_nodes`
        nodes: two gradients of the marginal) and say so when it is more than
        :attr:`bias_tolerance` posterior sds (default 0.1): binary data and
        small groups, typically. None otherwise (also with quadrature, or
        when the plate subsamples).

        Usage::

            import pyro, pyro.distributions as dist

            def model(obs):
                mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
                sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
                with pyro.plate("groups", obs.shape[0], dim=-2):
                    u = pyro.sample("u", dist.Normal(mu, sigma))
                    with pyro.plate("obs", obs.shape[1], dim=-1):
                        pyro.sample("z", dist.Bernoulli(logits=u), obs=obs)

            obs = torch.bernoulli(torch.full((300, 3), 0.3))
            guide = AmortizedLaplaceGuide(model, unit_plate="groups")
            guide(obs)
            guide.check_fit(obs)   # e.g. "Laplace's integrals over the units move q(θ) by ..."
        """
        skip = self.bias_tolerance is None or self.quadrature is not None
        if skip or self.view.unit_indices is not None or not self.view.num_units:
            return None
        view = self.view.with_args(*args, **kwargs)
        with torch.no_grad():
            theta_hat, y_hat = (t.detach() for t in self._locs(view, None))
            q = self._gaussian(view, theta_hat, y_hat, None, False)
        try:
            bias = laplace_bias(
                view, theta_hat, y_hat, q.global_precision.detach(), num_nodes=self.bias_check_nodes
            )
        except NoLaplaceApproximation as error:  # the repaired guide exists; the marginal does not
            return f"Laplace's bias over the units could not be checked at θ̂ ({error})"
        if bias.max_shift <= self.bias_tolerance:
            return None
        names = view.global_coordinate_names()
        worst = int(bias.shift.abs().argmax())
        return (
            f"Laplace's integrals over the units move q(θ) by an estimated {bias.max_shift:.2g} "
            f"posterior sds (most on {names[worst]}): its posterior of the globals may be biased; "
            'refit with AmortizedLaplaceGuide(..., quadrature=5, global_precision="marginal"), or '
            "check with curvi.psis"
        )

    #: the largest Laplace bias (in posterior sds) :meth:`check_fit` lets
    #: pass; None turns the check off
    bias_tolerance: float | None = 0.1
    #: quadrature nodes of :meth:`check_fit`'s estimate (on the benchmark's
    #: logistic GLMM at 1 000 groups it costs 0.07 s beside a 1 s fit)
    bias_check_nodes: int = 5

    def _init_quadrature(self, view, theta):
        """The quadrature nodes of the collapsed ELBO: as given, or under
        ``"auto"`` the number that settles the log marginal to 0.01 nat at the
        initial θ̂ (then held: the objective must not jump)."""
        if view.unit_indices is not None:
            raise ValueError(
                "quadrature= integrates every unit at each step; it is not available when plate "
                f"'{self.unit_plate}' subsamples"
            )
        nodes = self.quadrature
        if nodes == "auto":
            with torch.enable_grad():
                nodes = quadrature_log_marginal(view, theta, self.mode_cache, num_nodes="auto").num_nodes
        self.register_buffer("quadrature_nodes", torch.tensor(nodes))

    @property
    def collapsed_nodes(self) -> int | None:
        """Quadrature nodes per dimension of the collapsed ELBO the guide is
        trained on (``quadrature=``), or None (the joint ELBO)."""
        if self.quadrature is None or self.prototype_trace is None:
            return None
        return int(self.quadrature_nodes)

    def default_loss(self, *args, **kwargs) -> pyro.infer.ELBO | None:
        """With ``quadrature=``, the collapsed ELBO
        (:class:`~curvi.particles.CollapsedELBO`); else as
        :meth:`LaplaceGuideBase.default_loss`."""
        if self.quadrature is None:
            return super().default_loss(*args, **kwargs)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return CollapsedELBO()

    def _locs(self, view, units):
        theta = self.loc_global
        if view.num_units != self.view.num_units:
            return self._locs_on_other_units(view, theta, units)
        rows = slice(None) if units is None else units
        if self.mode_fn is not None:
            y_start = self._user_modes(view, theta.detach(), units)
        else:
            shift = theta.detach() - self.mode_theta[rows]
            y_start = self.mode_cache[rows] + (self.mode_slope[rows] @ shift.unsqueeze(-1)).squeeze(-1)
        result = solve_modes(view, theta, y_start, units=units, xtol=self.xtol, max_iter=self.max_iter)
        warn_unconverged(result, units=units, stacklevel=4)
        self.mode_cache[rows] = result.y
        self.mode_theta[rows] = theta.detach()
        return theta, implicit_modes(view, theta, result, units=units)

    def _precision(self, view, theta_hat, y_hat, units):
        P = super()._precision(view, theta_hat, y_hat, units)
        if self.global_precision == "marginal":
            self._refresh_marginal(view, theta_hat.detach(), y_hat.detach(), P.schur.detach())
        return P

    def _unit_draws(self, view, thetas, loc_y, q, y):
        """With ``resample_units=M``: per draw of θ, one of M proposals from
        the Laplace conditional per unit, picked by its importance weight."""
        if self.resample_units is None:
            return y
        L = q.precision.cholesky.L_D
        with torch.no_grad():
            return torch.stack(
                [_laplace_draws(view, t, m, L, self.resample_units, None) for t, m in zip(thetas, loc_y)]
            )

    def _gaussian(self, view, theta_hat, y_hat, units, subsampled):
        if view.num_units != self.view.num_units:
            return self._gaussian_on_other_units(view, theta_hat, y_hat, units, subsampled)
        q = super()._gaussian(view, theta_hat, y_hat, units, subsampled)
        self.mode_slope[slice(None) if units is None else units] = -q.M.detach()
        self.fitted_precision = q.global_precision.detach()
        self.fitted_theta = theta_hat.detach().clone()
        self.fitted_count += 1
        return q

    # ---------------------------------------------------- data with other units
    def _other_units(self, args, kwargs, signature, num_units):
        """Data with another number of units (new groups, prediction): a view of
        the model on them (traced once per data shape) and plates of their sizes."""
        if self.master is not None:
            raise ValueError(
                f"{self._other_units_message(num_units)}; inside an AutoGuideList the plates are "
                "the list's, set up for the fitted data"
            )
        if self._other_data is None or self._other_data[0] != signature:
            view = ModelView(
                self.model,
                *args,
                unit_plate=self.unit_plate,
                init_loc_fn=self.init_loc_fn,
                check_structure=self.check_structure,
                **kwargs,
            )

            def shapes(v):
                return [(s.name, s.shape) for s in v.global_layout + v.local_layout]

            if shapes(view) != shapes(self.view):
                raise ValueError(
                    "these data give the model other latent sites or shapes than the fitted data "
                    f"(globals {view.global_sites} of dimension {view.global_dim}, {view.local_dim} "
                    f"per unit; fitted: {self.view.global_sites}, {self.view.global_dim}, "
                    f"{self.view.local_dim})"
                )
            self._other_data = (signature, view, view.init_y.clone())
        view = self._other_data[1].with_args(*args, **kwargs)
        plates = {}
        if self.create_plates is not None:
            made = self.create_plates(*args, **kwargs)
            plates = {p.name: p for p in ([made] if isinstance(made, pyro.plate) else made)}
        for name, frame in view.plate_frames.items():
            if name not in plates:
                size = frame.full_size or frame.size
                plates[name] = pyro.plate(name, size, dim=frame.dim, subsample_size=frame.size)
        return view, plates

    def _locs_on_other_units(self, view, theta, units):
        """θ̂ and the conditional modes of the other data's units, solved from
        the last modes found on the same data (the fitted units' cache is
        left alone)."""
        cache = self._other_data[2]
        rows = slice(None) if units is None else units
        y_start = cache[rows] if self.mode_fn is None else self._user_modes(view, theta.detach(), units)
        result = solve_modes(view, theta, y_start, units=units, xtol=self.xtol, max_iter=self.max_iter)
        warn_unconverged(result, units=units, stacklevel=5)
        cache[rows] = result.y
        return theta, implicit_modes(view, theta, result, units=units)

    def _gaussian_on_other_units(self, view, theta_hat, y_hat, units, subsampled):
        """q(θ) as fitted, and each new unit's q(yᵢ | θ) from its own curvature:
        the posterior of new units given the fitted posterior of θ."""
        P = LaplaceGuideBase._precision(self, view, theta_hat, y_hat, units)
        S = self._fitted_global_precision(theta_hat.detach())
        Q = P.with_schur(S, cross_scale=1 / math.sqrt(view.unit_scale(y_hat.shape[0])))
        return LaplaceGaussian(theta_hat, y_hat, Q, subsampled=subsampled, units=units, epoch=self._epoch())

    def _fitted_global_precision(self, theta):
        """S on the fitted data at ``theta``: the stored one if it was computed
        at this θ̂ (or the plate subsamples: its running average), else
        recomputed from the fitted data (held by the guide's view)."""
        if self.view.unit_indices is not None:
            if self.running_count == 0:
                raise ValueError("the guide has not been trained yet: no q(θ) to read other data with")
            return self.running_schur
        if self.fitted_count == 0 or not torch.equal(theta, self.fitted_theta):
            with torch.no_grad():
                theta_hat, y_hat = self._locs(self.view, None)
                self._gaussian(self.view, theta_hat, y_hat, None, False)
        return self.fitted_precision

    def _epoch(self):
        return int(self.marginal_count) if self.global_precision == "marginal" else 0

    @contextmanager
    def holding_global_precision(self) -> Iterator[None]:
        """Within this context the rule for q(θ)'s precision S is held: the
        ``"marginal"`` curvature is not recomputed however far θ̂ moves, so
        the ELBO is one smooth function of θ̂ -- what a line search needs
        (:class:`~curvi.laplace_newton.LaplaceNewton` holds it within a noise
        block). Without effect for ``"joint"``.

        Usage::

            import pyro, pyro.distributions as dist

            def model(obs):
                mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
                with pyro.plate("groups", obs.shape[0], dim=-2):
                    u = pyro.sample("u", dist.Normal(mu, 1.0))
                    with pyro.plate("obs", obs.shape[1], dim=-1):
                        pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

            obs = torch.poisson(torch.full((8, 4), 3.0))
            guide = AmortizedLaplaceGuide(model, unit_plate="groups")
            guide(obs)
            with guide.holding_global_precision(), torch.no_grad():
                guide.loc_global_unconstrained.add_(3.0)
                guide(obs)   # S from the curvature computed before the move
        """
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def _refresh_marginal(self, view, theta, y, schur):
        """Recompute the marginal curvature at θ̂ unless it was computed at this
        θ̂ or the rule is held: q(θ) is then a function of θ̂ alone."""
        if self.marginal_count > 0 and (self._held or torch.equal(theta, self.marginal_theta)):
            return
        marginal = -laplace_hessian(view, theta, y, quadrature=self.collapsed_nodes)
        self.marginal_correction = marginal - schur
        self.marginal_theta = theta.clone()
        self.marginal_count += 1

    def _global_precision(self, P, subsampled):
        S = super()._global_precision(P, subsampled)
        if self.global_precision == "joint":
            return S
        return self.repair(S + self.marginal_correction).matrix

    def _read_out_precision(self, view, theta_hat, y, P):
        if view.num_units != self.view.num_units:
            return P.with_schur(self._fitted_global_precision(theta_hat))
        if self.global_precision == "joint":
            return P
        return P.with_schur(-laplace_hessian(view, theta_hat, y, quadrature=self.collapsed_nodes))

    def _other_units_message(self, num_units):
        return (
            f"AmortizedLaplaceGuide was set up for {self.view.num_units} units of plate "
            f"'{self.unit_plate}'; these data have {num_units}"
        )

    def _user_modes(self, view, theta, units):
        y = self.mode_fn(theta, *view.args, **view.kwargs)
        expected = (view.num_units, view.local_dim)
        if not torch.is_tensor(y) or tuple(y.shape) != expected:
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"mode_fn must return a tensor of shape {expected}, got {shape}")
        y = y.detach().to(dtype=view.dtype, device=view.device)
        return y if units is None else y[units]
