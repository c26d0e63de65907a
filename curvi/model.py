"""A Pyro model seen as a pure log density over global and unit-level coordinates.

:class:`ModelView` traces a model once and splits its latent sites into
*global* sites θ (outside the unit plate) and *local* sites y (inside it).
Every other curvi module works on the flat unconstrained coordinates it
defines:

* ``theta`` -- shape ``(p,)``: the global sites in execution order, each
  mapped to unconstrained space and flattened row-major;
* ``y`` -- shape ``(N, k)``: one row per unit, the concatenation of that
  unit's unconstrained values of the local sites in execution order.

``view.log_joint(theta, y)`` is a pure function of these coordinates
(Jacobians of the constraint transforms included) that ``torch.autograd``
and ``torch.func`` can differentiate.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible, init_to_median
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from . import distributed
from .hidden_sites import HiddenSites, check_deterministic, enumerated_terms, without_blocks
from .unit_split import find_unit_split


class SiteLayout(NamedTuple):
    """Where one latent site lives in the flat coordinates.

    ``offset:offset+size`` is the site's slice of ``theta`` (global sites) or
    of each row of ``y`` (local sites, ``size`` per unit). ``shape`` is the
    unconstrained value's shape with the unit axis removed for local sites,
    and ``unit_axis`` (negative) is where that axis sits in the unconstrained
    value; ``None`` for global sites.
    """

    name: str
    transform: torch.distributions.Transform
    shape: torch.Size
    offset: int
    size: int
    unit_axis: int | None

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class ModelView:
    r"""A Pyro model as a pure log density over flat unconstrained coordinates.

    The model is traced once (at a point drawn by ``init_loc_fn``). Latent
    sites inside ``unit_plate`` are *local*: one block of ``k`` coordinates per
    unit. All other latent sites are *global*. Observed sites, factors and
    sites in other plates (for example a long-format observation plate that
    indexes the unit latents, ``u[group]``) all enter :meth:`log_joint`.

    curvi's structured computations assume that no term of the log density
    couples two units except through the globals (the Hessian is then block
    arrowhead). The plates cannot prove this when observations index the unit
    latents, so the view checks it at set-up with a few Hessian-vector
    products along random directions on random halves of the units.

    Usage::

        import torch, pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(x, obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = pyro.sample("tau", dist.HalfNormal(1.0))
            with pyro.plate("groups", x.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, tau))
                with pyro.plate("obs", x.shape[1], dim=-1):
                    pyro.sample("y", dist.Normal(u, 1.0), obs=obs)

        x = torch.zeros(5, 3)
        view = ModelView(model, x, torch.randn(5, 3), unit_plate="groups")
        view.global_sites, view.local_sites  # ('mu', 'tau'), ('u',)
        theta, y = view.init_theta, view.init_y  # shapes (2,), (5, 1)
        view.log_joint(theta, y)  # a scalar tensor

    :param callable model: a Pyro model.
    :param args: positional arguments of ``model``, bound to the view.
    :param str unit_plate: name of the :func:`pyro.plate` of the units, or
        ``None`` for a model without one: every latent is then global
        (``p`` coordinates, ``y`` of shape ``(0, 0)``, ``num_units == 0``),
        and the Hessian is the dense ``p × p`` one.
    :param callable init_loc_fn: a Pyro init strategy that gives the point at
        which the model is traced (see :mod:`pyro.infer.autoguide.initialization`).
    :param bool check_structure: verify at set-up that no term couples two
        units except through the globals.
    :param kwargs: keyword arguments of ``model``, bound to the view.
    :raises ValueError: for a discrete latent site, a latent site in a
        subsampled plate other than the unit plate, a unit plate the model
        does not have or that holds no latent site, a log density that is not
        finite at the initial point, or a model whose units are coupled.
    """

    def __init__(
        self,
        model: Callable,
        *args,
        unit_plate: str | None,
        init_loc_fn: Callable[[Message], torch.Tensor] = init_to_median,
        check_structure: bool = True,
        **kwargs,
    ):
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        if isinstance(unit_plate, (tuple, list)) and len(unit_plate) == 1:
            unit_plate = unit_plate[0]  # one grouping factor: the arrowhead path
        if unit_plate is not None and not isinstance(unit_plate, str):
            raise ValueError(f"unit_plate must be the name of a pyro.plate or None, got {unit_plate!r}")
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.unit_plate = unit_plate

        trace = _trace_prototype(model, init_loc_fn, args, kwargs)
        # the model without its poutine.block wrappers: its density is what the
        # Laplace approximation needs, including the sites hidden from the guide
        self._full_model, blocked = without_blocks(model)
        full_trace = _trace_prototype(self._full_model, init_loc_fn, args, kwargs) if blocked else trace
        # curvi evaluates the model with Pyro's validation off (torch.func):
        # its observed values are checked here instead, and in with_args
        check_observed(full_trace)
        self._checked_data = [(args, kwargs, None)]  # shared by with_args's copies
        frame = None if unit_plate is None else _find_unit_frame(trace, unit_plate)
        #: units in the plate (0 without a unit plate: every latent is global)
        self.num_units = (
            0 if frame is None else frame.full_size if frame.full_size is not None else frame.size
        )
        #: the unit plate's dim (None without a unit plate)
        self.unit_dim = None if frame is None else frame.dim
        #: how many plate dims the model's sites use (observed ones included):
        #: Trace_ELBO's ``max_plate_nesting``
        self.max_plate_nesting = max(
            (
                -f.dim
                for site in full_trace.nodes.values()
                if site["type"] == "sample"
                for f in site["cond_indep_stack"]
                if f.vectorized and f.dim is not None
            ),
            default=0,
        )
        subsampled = frame is not None and frame.size < self.num_units
        self.unit_indices = trace.nodes[unit_plate]["value"] if subsampled else None
        if distributed.world_size() > 1:
            if frame is None:
                raise ValueError(
                    "under torch.distributed curvi shares the units of a unit plate among the "
                    "processes; pass unit_plate= (the plate of the units given by curvi.local_units)"
                )
            if subsampled:
                raise ValueError(
                    f"under torch.distributed plate '{unit_plate}' must hold this process's units "
                    "(curvi.local_units), not subsample them"
                )
            distributed.check_units(unit_plate, self.num_units)
        #: weight of the terms every process computes alike (the global latents'
        #: densities): 1/K under K processes sharing the units, else 1
        self.replicated_weight = distributed.replicated_weight()

        latent = [s for s in trace.nodes.values() if _is_latent(s)]
        for site in latent:
            _check_site(site, unit_plate)
        #: the vectorized plates of the latent sites, by name (their sizes on these data)
        self.plate_frames = {f.name: f for s in latent for f in s["cond_indep_stack"] if f.vectorized}
        self.global_layout = _layout([s for s in latent if not _in_plate(s, unit_plate)], unit_dim=None)
        self.local_layout = _layout([s for s in latent if _in_plate(s, unit_plate)], unit_dim=self.unit_dim)
        if unit_plate is not None and not self.local_layout:
            plates = sorted({f.name for s in latent for f in s["cond_indep_stack"]} - {unit_plate})
            raise ValueError(
                f"unit plate '{unit_plate}' holds no latent sample site; the unit "
                "plate must be the plate of the unit-level latents"
                + (f" (latent sites sit in plates {plates})" if plates else "")
            )
        self.global_dim = sum(s.size for s in self.global_layout)
        self.local_dim = sum(s.size for s in self.local_layout)
        owned = frozenset(s["name"] for s in latent)
        #: latent sites hidden from the view by poutine.block: summed out or conditioned on
        self.hidden = HiddenSites.of(full_trace, owned)
        if self.hidden.enumerated and distributed.world_size() > 1:
            raise ValueError(
                f"sites {list(self.hidden.enumerated)} are summed out by enumeration, which curvi "
                "does not share among processes"
            )
        if self.hidden.enumerated and self.unit_indices is not None:
            raise ValueError(
                f"sites {list(self.hidden.enumerated)} are summed out by enumeration, which curvi "
                f"does not combine with a subsampled unit plate '{unit_plate}'"
            )
        #: values of the conditioned hidden sites (replaced per call, :meth:`with_conditions`)
        self.conditions = {n: full_trace.nodes[n]["value"].detach() for n in self.hidden.conditioned}
        self._latent_names = owned | frozenset(self.hidden.enumerated + self.hidden.conditioned)
        self._split_cache = []  # [(args, kwargs, units), split] of unit_log_joint's last split
        self._separable = None
        #: names of the model's ``pyro.param`` sites, in execution order
        self.param_sites = tuple(n for n, s in trace.nodes.items() if s["type"] == "param")
        #: number of observed elements (for information criteria)
        self.num_observations = sum(
            s["value"].numel()
            for s in full_trace.nodes.values()
            if s["type"] == "sample"
            and s["is_observed"]
            and not site_is_subsample(s)
            and not s["infer"].get("_deterministic")
            and not _is_factor(s)
        )

        if not latent:
            raise ValueError("the model has no latent sample site: there is nothing to infer")
        values = {s["name"]: s["value"].detach() for s in latent}
        self.init_theta, self.init_y = self.pack(values)
        # processes sharing the units start from rank 0's globals (their draws differ)
        self.init_theta = distributed.broadcast(self.init_theta, "the initial globals")
        self.check_finite(self.init_theta, self.init_y)
        check_deterministic(lambda: self.log_joint(self.init_theta, self.init_y))
        if check_structure:
            self.check_arrowhead(self.init_theta, self.init_y)

    # ------------------------------------------------------------------ layout
    @property
    def global_sites(self) -> tuple[str, ...]:
        """Names of the global latent sites, in execution order."""
        return tuple(s.name for s in self.global_layout)

    @property
    def local_sites(self) -> tuple[str, ...]:
        """Names of the local (per-unit) latent sites, in execution order."""
        return tuple(s.name for s in self.local_layout)

    @property
    def dtype(self) -> torch.dtype:
        return self.init_y.dtype

    @property
    def device(self) -> torch.device:
        return self.init_y.device

    @property
    def num_present_units(self) -> int:
        """Units in the traced run: the subsample size when the plate subsamples."""
        return self.init_y.shape[0]

    def unit_scale(self, num_present: int) -> float:
        """``N / n``: how much a batch of ``n`` units' terms are scaled up to
        stand for all ``N`` (1 without units).

        Usage::

            import pyro, pyro.distributions as dist

            def model():
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
                with pyro.plate("groups", 8):
                    pyro.sample("u", dist.Normal(mu, 1.0))

            ModelView(model, unit_plate="groups").unit_scale(2)   # 4.0
        """
        return self.num_units / num_present if num_present else 1.0

    def global_coordinate_names(self) -> list[str]:
        """Readable names of the ``p`` unconstrained global coordinates."""
        return _coordinate_names(self.global_layout)

    def local_coordinate_names(self) -> list[str]:
        """Readable names of the ``k`` unconstrained coordinates of one unit."""
        return _coordinate_names(self.local_layout)

    # -------------------------------------------------------- pack / unpack
    def pack(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map constrained site values to flat unconstrained ``(theta, y)``.

        :param dict values: a value for every latent site, by name.
        :returns: ``theta`` of shape ``(p,)`` and ``y`` of shape ``(n, k)``,
            ``n`` the number of units present in the local values.
        """
        missing = [n for n in self.global_sites + self.local_sites if n not in values]
        if missing:
            raise ValueError(f"pack() needs a value for every latent site; missing {missing}")
        y = [_unit_rows(s.transform.inv(values[s.name]), s.unit_axis) for s in self.local_layout]
        sizes = {t.shape[0] for t in y}
        if len(sizes) > 1:
            raise ValueError(f"local site values disagree on the number of units: {sizes}")
        if not y:  # no unit plate: every latent is global, y has no rows
            theta = self.pack_globals(values)
            return theta, theta.new_zeros(0, 0)
        return self.pack_globals(values, like=y[0]), torch.cat(y, dim=-1)

    def pack_globals(
        self, values: dict[str, torch.Tensor], *, like: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Map constrained values of the global sites to ``theta`` ``(p,)``
        (differentiable; ``like`` gives dtype and device when p = 0)."""
        missing = [n for n in self.global_sites if n not in values]
        if missing:
            raise ValueError(f"pack_globals() needs a value for every global site; missing {missing}")
        theta = [s.transform.inv(values[s.name]).reshape(-1) for s in self.global_layout]
        if theta:
            return torch.cat(theta)
        like = self.init_y if like is None else like
        return like.new_zeros(0)

    def unpack(self, theta: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map flat unconstrained ``(theta, y)`` to constrained site values."""
        values, _ = self._constrain(theta, y, jacobian=False)
        return values

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a flat vector ``x = [theta, y.flatten()]`` into ``(theta, y)``."""
        return x[: self.global_dim], x[self.global_dim :].reshape(-1, self.local_dim)

    def flatten(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The flat vector ``[theta, y.flatten()]`` (units-major), as in ``to_dense``."""
        return torch.cat([theta, y.reshape(-1)])

    # ------------------------------------------------------------ log density
    def log_joint(
        self, theta: torch.Tensor, y: torch.Tensor, *, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log joint density of the model at unconstrained ``(theta, y)``.

        Includes every observed site and factor and the log-abs-det-Jacobians
        of the constraint transforms. A pure function of its inputs, usable
        under ``torch.func`` transforms.

        :param theta: global coordinates, shape ``(p,)``.
        :param y: local coordinates, shape ``(n, k)``.
        :param units: indices of the ``n`` units that ``y`` holds when the
            unit plate subsamples (default: the units of the traced run).
            Unit-plate terms are scaled by ``N / n`` as :func:`pyro.plate` does.
        """
        return sum(self.log_joint_terms(theta, y, units=units).values())

    def log_joint_terms(
        self, theta: torch.Tensor, y: torch.Tensor, *, units: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The terms of :meth:`log_joint` by site: each sample site's scaled
        log probability, and ``"log|J| <site>"`` for each transformed latent."""
        return {name: t.sum() for name, (t, _) in self._terms(theta, y, units).items()}

    def unit_log_joint(
        self, theta: torch.Tensor, y: torch.Tensor, *, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each unit's own terms of :meth:`log_joint`, shape ``(n,)``.

        Unit i's entry sums the log probabilities of the sites in the unit
        plate that belong to unit i, and its local Jacobian terms (scaled as
        in :meth:`log_joint`); for a model whose observations sit outside the
        unit plate and index the unit latents (long format), also the
        observations of unit i, found from the derivatives once per data
        (:func:`~curvi.unit_split.find_unit_split`). ``log_joint`` minus the
        sum does not depend on ``y``.

        Usage::

            import pyro, pyro.distributions as dist

            def model():
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
                with pyro.plate("groups", 4):
                    u = pyro.sample("u", dist.Normal(mu, 1.0))
                    pyro.sample("z", dist.Normal(u, 1.0), obs=torch.zeros(4))

            view = ModelView(model, unit_plate="groups")
            view.separable  # True: every term with u sits in the plate
            view.unit_log_joint(view.init_theta, view.init_y)  # shape (4,)
        """
        split = None if self.separable else self._unit_split(theta, y, units)
        n = y.shape[0]
        total = y.new_zeros(n)
        for name, (t, per_unit) in self._terms(theta, y, units).items():
            if per_unit:
                total = total + t.movedim(self.unit_dim, 0).reshape(n, -1).sum(-1)
            elif split is not None and split.get(name) is not None:
                rows, t = split[name], t.reshape(-1)
                total = total.index_add(0, rows.clamp_min(0), torch.where(rows >= 0, t, 0.0))
        return total

    def _unit_split(self, theta, y, units):
        """The unit of each element of the terms outside the unit plate
        (:func:`~curvi.unit_split.find_unit_split`), found once per data
        (and batch of units) and shared by the views made by :meth:`with_args`."""
        key = (self.args, self.kwargs, units)
        cached = self._split_cache
        if cached and _same_objects(cached[0], key):
            return cached[1]
        split = find_unit_split(self, theta, y, units=units)
        cached[:] = [key, split]
        return split

    @property
    def separable(self) -> bool:
        """Whether all terms that involve ``y`` sit in the unit plate, so
        that :meth:`unit_log_joint` splits the log density by unit."""
        if self._separable is None:
            theta, y = self.init_theta, self.init_y.detach().requires_grad_(True)
            with torch.enable_grad():
                terms = self._terms(theta, y, None).values()
                rest = sum(t.sum() for t, per_unit in terms if not per_unit)
                if not torch.is_tensor(rest) or not rest.requires_grad:
                    self._separable = True
                else:
                    (g,) = torch.autograd.grad(rest, y, allow_unused=True)
                    self._separable = g is None or not bool(g.abs().max() > 0)
        return self._separable

    def num_units_of(self, *args, **kwargs) -> int:
        """The number of units the model has when called with ``*args,
        **kwargs`` (new data may have other units than the traced ones): one
        blocked trace of the model at a feasible point (no random draws).

        Usage::

            import pyro, pyro.distributions as dist

            def model(obs):
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
                with pyro.plate("groups", len(obs)):
                    pyro.sample("u", dist.Normal(mu, 1.0))

            view = ModelView(model, torch.zeros(3), unit_plate="groups")
            view.num_units, view.num_units_of(torch.zeros(5))   # 3, 5
        """
        if self.unit_plate is None:
            return 0
        frame = _find_unit_frame(
            _trace_prototype(self.model, init_to_feasible, args, kwargs), self.unit_plate
        )
        return frame.full_size if frame.full_size is not None else frame.size

    def apply_to_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelView:
        """The same view with ``fn`` applied to the tensors it holds (the
        initial point and the traced subsample's unit indices), as
        :meth:`torch.nn.Module._apply` applies it to a module's parameters:
        what ``guide.to(dtype)`` or ``guide.to(device)`` does to the view.

        Usage::

            import pyro, pyro.distributions as dist

            def model():
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
                with pyro.plate("groups", 3):
                    pyro.sample("u", dist.Normal(mu, 1.0))

            view = ModelView(model, unit_plate="groups")
            view.apply_to_tensors(lambda t: t.double() if t.is_floating_point() else t).dtype
        """
        view = copy.copy(self)
        view.init_theta, view.init_y = fn(self.init_theta), fn(self.init_y)
        if self.unit_indices is not None:
            view.unit_indices = fn(self.unit_indices)
        view.conditions = {n: fn(t) for n, t in self.conditions.items()}
        return view

    def with_conditions(self, values: dict[str, torch.Tensor]) -> ModelView:
        """The same view with new values of the conditioned hidden sites
        (:attr:`hidden`), e.g. the ones another guide has just drawn.

        Usage::

            import pyro, pyro.distributions as dist
            import pyro.poutine as poutine

            def model():
                sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
                with pyro.plate("groups", 3):
                    pyro.sample("u", dist.Normal(mu, sigma))

            view = ModelView(poutine.block(model, hide=["sigma"]), unit_plate="groups")
            view.hidden.conditioned                                  # ('sigma',)
            wider = view.with_conditions({"sigma": torch.tensor(2.0)})
            wider.log_joint(view.init_theta, view.init_y)            # log p at sigma = 2
        """
        unknown = set(values) - set(self.hidden.conditioned)
        if unknown:
            raise ValueError(
                f"sites {sorted(unknown)} are not conditioned hidden sites of this view "
                f"(those are {list(self.hidden.conditioned)})"
            )
        view = copy.copy(self)
        view.conditions = {**self.conditions, **values}
        return view

    def with_args(self, *args, **kwargs) -> ModelView:
        """The same view (same layout) of the model called with other
        arguments, e.g. a new minibatch of data. Data not seen before (other
        objects than the last checked) are traced once at a feasible point
        and their observed values checked (:func:`check_observed`)."""
        view = copy.copy(self)
        view.args, view.kwargs = args, kwargs
        key = (args, kwargs, None)
        if not _same_objects(self._checked_data[0], key):  # new data: one trace to check them
            check_observed(_trace_prototype(self._full_model, init_to_feasible, args, kwargs))
            self._checked_data[0] = key
        return view

    def unpack_unconstrained(self, theta: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained site values from ``theta`` (..., p) and ``y`` (..., n, k).

        Leading batch dimensions are kept in front of each site's own shape;
        local sites get their unit axis of size n back in place.
        """
        batch = theta.shape[:-1]
        values = {s.name: theta[..., s.slice].reshape(batch + s.shape) for s in self.global_layout}
        batch = y.shape[:-2]
        for s in self.local_layout:
            u = y[..., s.slice].reshape(batch + (y.shape[-2],) + s.shape)
            values[s.name] = u.movedim(len(batch), s.unit_axis)
        return values

    def _terms(self, theta, y, units) -> dict:
        """Every term of the log density as ``name -> (tensor, per_unit)``:
        the scaled, masked log probability of each sample site (not summed)
        and the Jacobian terms; ``per_unit`` marks tensors whose axis
        ``unit_dim`` indexes the units."""
        self._check_coordinates(theta, y)
        units = self._units(y, units)
        values, log_jac = self._constrain(theta, y, jacobian=True, num_present=y.shape[0])
        data = {**self.conditions, **values}
        if units is not None:
            data[self.unit_plate] = units
        model = self.hidden.enumerate(poutine.condition(self._full_model, data), self.max_plate_nesting)
        with pyro.validation_enabled(False):
            trace = poutine.block(poutine.trace(model).get_trace)(*self.args, **self.kwargs)
        # a masked latent's Jacobian is masked with its density: a masked entry
        # has no density in either space (docs/design.md, pitfalls)
        for name, site in trace.nodes.items():
            key = f"log|J| {name}"
            if key in log_jac and torch.is_tensor(site["mask"]):
                t, local = log_jac[key]
                log_jac[key] = (scale_and_mask(t, 1.0, site["mask"]), local)
        if self.hidden.enumerated:
            terms = enumerated_terms(trace, self.unit_plate)
            terms.update(log_jac)
            return terms
        terms = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if name not in self._latent_names and not site["is_observed"]:
                raise ValueError(
                    f"site '{name}' is latent but did not appear when the view traced "
                    "the model; curvi needs a model with a static set of latent sites"
                )
            log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            log_p = scale_and_mask(log_p, site["scale"], site["mask"])
            per_unit = (
                self.unit_dim is not None
                and _in_plate(site, self.unit_plate)
                and log_p.dim() >= -self.unit_dim
            )
            terms[name] = (log_p, per_unit)
        terms.update(log_jac)
        if self.replicated_weight != 1:  # this process's share of the globals' densities
            for name in self.global_sites:
                for key in (name, f"log|J| {name}"):
                    if key in terms:
                        terms[key] = (terms[key][0] * self.replicated_weight, False)
        return terms

    # ---------------------------------------------------------------- checks
    def check_finite(
        self, theta: torch.Tensor, y: torch.Tensor, *, units: torch.Tensor | None = None
    ) -> None:
        """Raise a ``ValueError`` naming the sites whose log density is NaN or
        infinite at ``(theta, y)``."""
        for name, t in (("theta", theta), ("y", y)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} holds non-finite coordinates")
        with torch.no_grad():
            terms = self.log_joint_terms(theta, y, units=units)
        bad = {n: float(v) for n, v in terms.items() if not torch.isfinite(v)}
        if bad:
            described = ", ".join(f"'{n}' ({v})" for n, v in bad.items())
            raise ValueError(
                f"log density is not finite at the requested point; sites responsible: {described}"
            )

    def check_arrowhead(
        self, theta: torch.Tensor, y: torch.Tensor, *, num_probes: int = 3, seed: int = 0
    ) -> None:
        """Check that no term couples two units except through the globals.

        Each probe perturbs the local coordinates of a random half of the
        units and checks, by one Hessian-vector product, that the gradient of
        the other half does not move. Raises a ``ValueError`` naming a unit
        that responds to another unit's coordinates.
        """
        n = y.shape[0]
        if n < 2:
            return
        th = theta.detach()
        yy = y.detach().requires_grad_(True)
        with torch.enable_grad():
            (g_y,) = torch.autograd.grad(self.log_joint(th, yy), yy, create_graph=True)
        if not g_y.requires_grad:  # log density linear in y: Hessian zero
            return
        generator = torch.Generator().manual_seed(seed)
        tol = torch.finfo(y.dtype).eps ** 0.5
        for probe in range(num_probes):
            half = torch.randperm(n, generator=generator)[: n // 2].to(y.device)
            inside = torch.zeros(n, dtype=torch.bool, device=y.device)
            inside[half] = True
            v = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
            v = v * inside.unsqueeze(-1)
            (hv,) = torch.autograd.grad(g_y, yy, v, retain_graph=probe < num_probes - 1, allow_unused=True)
            if hv is None:
                return
            leak = hv[~inside].abs().amax(-1)
            scale = hv.abs().max().clamp_min(1.0)
            if leak.max() > tol * scale:
                unit = int(torch.arange(n, device=y.device)[~inside][leak.argmax()])
                raise ValueError(
                    f"units are coupled: the gradient of unit {unit} of plate "
                    f"'{self.unit_plate}' changes when other units' local coordinates "
                    f"move (|Hv| = {float(leak.max()):.3g}); curvi needs every term "
                    "that involves two units to go through the global sites only"
                )

    # --------------------------------------------------------------- helpers
    def _units(self, y, units):
        if units is None:
            units = self.unit_indices
            if units is not None and y.shape[0] != units.shape[0]:
                raise ValueError(
                    f"y has {y.shape[0]} rows but the traced subsample of plate "
                    f"'{self.unit_plate}' has {units.shape[0]} units; pass units="
                )
            if units is None and y.shape[0] != self.num_units:
                raise ValueError(
                    f"y has {y.shape[0]} rows but plate '{self.unit_plate}' has "
                    f"{self.num_units} units; pass units= to evaluate a subsample"
                )
            return units
        units = torch.as_tensor(units, device=y.device)
        if units.dim() != 1 or units.shape[0] != y.shape[0]:
            raise ValueError(
                f"units must be a 1-d index tensor with one entry per row of y "
                f"({y.shape[0]}), got shape {tuple(units.shape)}"
            )
        return units

    def _check_coordinates(self, theta, y):
        if theta.shape != (self.global_dim,):
            raise ValueError(f"theta must have shape ({self.global_dim},), got {tuple(theta.shape)}")
        if y.dim() != 2 or y.shape[1] != self.local_dim:
            raise ValueError(f"y must have shape (n, {self.local_dim}), got {tuple(y.shape)}")

    def _constrain(self, theta, y, *, jacobian, num_present=None):
        values, log_jac = {}, {}
        unconstrained = self.unpack_unconstrained(theta, y)
        scale = 1.0 if num_present is None else self.unit_scale(num_present)
        for s in self.global_layout + self.local_layout:
            u = unconstrained[s.name]
            values[s.name] = x = s.transform(u)
            if jacobian and not _is_identity(s.transform):
                local = s.unit_axis is not None
                ladj = s.transform.log_abs_det_jacobian(u, x)
                log_jac[f"log|J| {s.name}"] = (scale * ladj if local else ladj, local)
        return values, log_jac


# ---------------------------------------------------------------- set-up steps
def check_observed(trace) -> None:
    """Refuse, naming the site, observed values that the model's density
    cannot take: a shape that disagrees with a plate the site sits in or
    with its distribution, NaN or infinite entries, and (while Pyro's
    validation is on, as by default) values outside the distribution's
    support -- a negative or fractional count, say. Masked entries
    (``poutine.mask``, ``obs_mask``) are not checked.

    Pyro checks the support when it computes a log probability; curvi
    computes them with validation off (``torch.func`` cannot run the
    data-dependent checks), so it checks the data here, once per data.

    Usage::

        import pyro, pyro.distributions as dist, pyro.poutine as poutine

        def model(counts):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
            with pyro.plate("days", len(counts)):
                pyro.sample("c", dist.Poisson(rate), obs=counts)

        check_observed(poutine.trace(model).get_trace(torch.tensor([0.0, 3.0])))  # fine
        try:
            check_observed(poutine.trace(model).get_trace(torch.tensor([0.0, 2.5])))
        except ValueError as error:
            print(error)  # observed site 'c' has 1 of 2 values outside the support ...

    :raises ValueError: naming the site, and the plate or the offending value.
    """
    validate = pyro.distributions.is_validation_enabled()
    for name, site in trace.nodes.items():
        if (
            site["type"] != "sample"
            or not site["is_observed"]
            or site_is_subsample(site)
            or site["infer"].get("_deterministic")
            or _is_factor(site)
            or not torch.is_tensor(site["value"])
        ):
            continue
        problem = _observed_problem(site, validate)
        if problem:
            raise ValueError(f"observed site '{name}' {problem}")


def _observed_problem(site, validate):
    value, fn = site["value"].detach(), site["fn"]
    shape, event_dim = tuple(value.shape), fn.event_dim
    for f in site["cond_indep_stack"]:
        axis = None if not f.vectorized or f.dim is None else f.dim - event_dim
        if axis is not None and len(shape) >= -axis and shape[axis] not in (1, f.size):
            return (
                f"has shape {shape}, but it sits in plate '{f.name}' of size {f.size} (dim {f.dim}), "
                f"along which it has {shape[axis]} entries: its values must have the plate's size there"
            )
    expected = tuple(fn.batch_shape + fn.event_shape)
    try:
        torch.broadcast_shapes(shape, expected)
    except RuntimeError:
        return f"has shape {shape}, which does not broadcast with its distribution's shape {expected}"
    mask = _observed_mask(site)
    if mask is False:
        return None
    entries = ~torch.isfinite(value)
    if event_dim:
        entries = entries.flatten(-event_dim).any(-1)
    bad = _unmasked(entries, mask)
    if bad.any():
        return (
            f"holds {int(bad.sum())} NaN or infinite value(s) of {bad.numel()} (the first "
            f"{_first(value, event_dim, bad)}); drop them, or mask them out (obs_mask=, poutine.mask)"
        )
    if not validate:
        return None
    try:
        entries = ~fn.support.check(value)
        bad = _unmasked(entries, mask)
    except (RuntimeError, ValueError, NotImplementedError):  # a support that cannot say
        return None
    if bad.any():
        return (
            f"has {int(bad.sum())} of {bad.numel()} values outside the support of its "
            f"{type(fn).__name__} distribution ({_describe_support(fn.support, fn)}); the first "
            f"{_first(value, event_dim, bad)}"
        )
    return None


def _observed_mask(site):
    """The site's mask: a tensor, ``None`` (every entry counts) or ``False``."""
    masks = [site["mask"]]
    if isinstance(site["fn"], MaskedDistribution):  # obs_mask=, fn.mask(...)
        masks.append(site["fn"]._mask)
    mask = None
    for m in masks:
        if m is None or m is True:
            continue
        if m is False:
            return False
        mask = m if mask is None else mask & m
    return mask


def _unmasked(entries, mask):
    if mask is None:
        return entries
    try:
        entries, mask = torch.broadcast_tensors(entries, mask.to(entries.device))
    except RuntimeError:
        return entries
    return entries & mask


def _first(value, event_dim, bad):
    """The first offending entry of ``value``, where ``bad`` (its batch
    shape, possibly broadcast further) is true."""
    index = tuple(int(i) for i in bad.nonzero()[0])
    try:
        shown = value.expand(bad.shape + value.shape[value.dim() - event_dim :])[index]
    except RuntimeError:  # a shape that does not say which entry it is
        return f"is at index {index}"
    shown = shown.item() if shown.numel() == 1 else shown.tolist()
    return f"is {shown} at index {index}" if index else f"is {shown}"


def _describe_support(support, fn):
    """A short name of ``fn``'s support (without the tensors of a dependent one)."""
    constraints = torch.distributions.constraints
    if isinstance(support, constraints.independent):
        return _describe_support(support.base_constraint, fn)
    if isinstance(support, constraints._IntegerGreaterThan):
        return "non-negative integers" if support.lower_bound == 0 else f"integers >= {support.lower_bound}"
    if isinstance(support, constraints._IntegerInterval):

        def bound(b):
            if isinstance(b, (int, float)):
                return f"{b:g}"
            return "total_count" if hasattr(fn, "total_count") else "its upper bound"

        return f"integers from {bound(support.lower_bound)} to {bound(support.upper_bound)}"
    if isinstance(support, constraints._Boolean):
        return "0 or 1"
    text = repr(support)
    return text if len(text) <= 60 else type(support).__name__.lstrip("_")


def _trace_prototype(model, init_loc_fn, args, kwargs):
    with pyro.validation_enabled(False), torch.no_grad():
        return poutine.block(poutine.trace(InitMessenger(init_loc_fn)(model)).get_trace)(*args, **kwargs)


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _is_factor(site) -> bool:
    return type(site["fn"]).__name__ == "Unit"


def _same_objects(a, b) -> bool:
    """Whether two (args, kwargs, units) keys hold the same objects."""
    (args_a, kwargs_a, units_a), (args_b, kwargs_b, units_b) = a, b
    return (
        len(args_a) == len(args_b)
        and all(x is y for x, y in zip(args_a, args_b))
        and kwargs_a.keys() == kwargs_b.keys()
        and all(kwargs_a[k] is kwargs_b[k] for k in kwargs_a)
        and units_a is units_b
    )


def _in_plate(site, plate_name) -> bool:
    return plate_name is not None and any(f.name == plate_name for f in site["cond_indep_stack"])


def _find_unit_frame(trace, unit_plate):
    frames = {}
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for f in site["cond_indep_stack"]:
                frames.setdefault(f.name, f)
    if unit_plate not in frames:
        raise ValueError(f"the model has no plate named '{unit_plate}'; its plates are {sorted(frames)}")
    frame = frames[unit_plate]
    if not frame.vectorized:
        raise ValueError(
            f"unit plate '{unit_plate}' is a sequential plate; curvi needs a vectorized "
            "pyro.plate (use it as a context manager)"
        )
    return frame


def _check_site(site, unit_plate):
    name, fn = site["name"], site["fn"]
    if fn.support.is_discrete:
        raise ValueError(
            f"Continuous inference cannot handle discrete sample site '{name}'. Consider "
            "enumerating that variable as documented in https://pyro.ai/examples/enumeration.html . "
            "Hide it when constructing the guide, e.g. "
            f"LaplaceGuide(poutine.block(model, hide=['{name}']), ...): curvi then sums it out "
            "of the guide's log density (an enumerable site), and TraceEnum_ELBO out of the ELBO"
        )
    for f in site["cond_indep_stack"]:
        if f.name != unit_plate and f.full_size is not None and f.size < f.full_size:
            allowed = (
                f"only the unit plate '{unit_plate}' may subsample"
                if unit_plate is not None
                else "without a unit plate every latent is global "
                f"(pass unit_plate='{f.name}' if it holds the units)"
            )
            raise ValueError(
                f"latent site '{name}' sits in plate '{f.name}', which subsamples "
                f"({f.size} of {f.full_size}); {allowed}, since curvi treats latents outside "
                "the unit plate as global"
            )


def _layout(sites, unit_dim):
    layout, offset = [], 0
    for site in sites:
        with helpful_support_errors(site):  # Pyro's pointers (a reparameterizer for a sphere, ...)
            transform = biject_to(site["fn"].support)
        shape = transform.inverse_shape(site["value"].shape)
        unit_axis = None
        if unit_dim is not None:
            unit_axis = unit_dim - transform.domain.event_dim
            shape = shape[:unit_axis] + shape[unit_axis:][1:]
        size = shape.numel()
        layout.append(SiteLayout(site["name"], transform, shape, offset, size, unit_axis))
        offset += size
    return tuple(layout)


def _unit_rows(u, unit_axis):
    u = u.movedim(unit_axis, 0)
    return u.reshape(u.shape[0], -1)


def _is_identity(transform) -> bool:
    """Whether a transform is the identity (``biject_to(real)``), whose Jacobian term is zero."""
    if isinstance(transform, torch.distributions.transforms.IndependentTransform):
        return _is_identity(transform.base_transform)
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not (transform.parts)


def _coordinate_names(layout):
    names = []
    for s in layout:
        if s.size == 1:
            names.append(s.name)
            continue
        for idx in itertools.product(*map(range, s.shape)):
            names.append(f"{s.name}[{','.join(map(str, idx))}]")
    return names
