"""A Pyro model with several grouping factors, seen as a log density over
its globals θ and all units' latents.

``FactorView(model, ..., unit_plate=("subject", "item"))`` takes the
model's latent sites in each named plate as that factor's units: ``N_f``
units of ``k_f`` coordinates each. Crossed designs (``(1 | subject) +
(1 | item)``) and nested ones (``(1 | school / class)``, the classes in a
plate of their own) are both written this way. Its coordinates are

* ``theta`` -- ``(p,)``: the latent sites outside every unit plate;
* ``x`` -- ``(Σ_f N_f k_f,)``: the units' latents, factor by factor in the
  order given, unit-major within a factor.

It is built on a :class:`~curvi.model.ModelView` without a unit plate (the
same constraint transforms, Jacobians, hidden sites and checks), whose
flat coordinates it re-indexes. Which units of different factors share a
term, and so the sparse Hessian's pattern, is read off the derivatives
(:mod:`curvi.sparse_hessian`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.runtime import Message

from . import distributed
from .model import ModelView, _trace_prototype

__all__ = ["FactorView", "unit_plates"]


def unit_plates(unit_plate) -> tuple[str, ...] | None:
    """The plate names of ``unit_plate`` when it names several grouping
    factors (a tuple or list of two or more names), else None.

    Usage::

        unit_plates(("subjects", "items")), unit_plates("groups"), unit_plates(["groups"])
        # ('subjects', 'items'), None, None
    """
    if isinstance(unit_plate, (tuple, list)):
        names = tuple(unit_plate)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"unit_plate must be a plate name or a tuple of plate names, got {unit_plate!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"unit_plate names a plate twice: {unit_plate!r}")
        return names if len(names) > 1 else None
    return None


class FactorView:
    """A Pyro model with several unit plates (grouping factors).

    Usage::

        import pyro, pyro.distributions as dist

        def model(subject, item, obs):       # (1 | subject) + (1 | item)
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("subjects", 4):
                a = pyro.sample("a", dist.Normal(0.0, 1.0))
            with pyro.plate("items", 3):
                b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", len(obs)):
                pyro.sample("z", dist.Normal(mu + a[subject] + b[item], 1.0), obs=obs)

        subject, item = torch.arange(12) % 4, torch.arange(12) // 4
        view = FactorView(model, subject, item, torch.randn(12), unit_plate=("subjects", "items"))
        view.factor_sizes, view.factor_dims      # (4, 3), (1, 1)
        view.log_joint(view.init_theta, view.init_y)

    :param callable model: a Pyro model.
    :param tuple unit_plate: the names of the plates of the grouping factors.
    :param callable init_loc_fn: the Pyro init strategy of the traced point.
    :raises ValueError: for a plate the model does not have or whose plate
        holds no latent site, a latent site in two of the plates, or a
        subsampled unit plate.
    """

    def __init__(
        self,
        model: Callable,
        *args,
        unit_plate: tuple[str, ...],
        init_loc_fn: Callable[[Message], torch.Tensor] = init_to_median,
        **kwargs,
    ):
        names = unit_plates(unit_plate)
        if names is None:
            raise ValueError(f"FactorView needs two or more unit plates, got {unit_plate!r}")
        if distributed.world_size() > 1:
            raise ValueError(
                "several grouping factors are integrated jointly through one sparse Hessian, which "
                "curvi does not share among processes; under torch.distributed use one unit plate"
            )
        self.unit_plate = names
        self.base = ModelView(
            model, *args, unit_plate=None, init_loc_fn=init_loc_fn, check_structure=False, **kwargs
        )
        trace = _trace_prototype(model, init_loc_fn, args, kwargs)
        frames = {
            f.name: f for s in trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]
        }
        for name in names:
            if name not in frames:
                raise ValueError(f"the model has no plate named '{name}'; its plates are {sorted(frames)}")
            f = frames[name]
            if not f.vectorized:
                raise ValueError(
                    f"unit plate '{name}' is a sequential plate; curvi needs a vectorized pyro.plate"
                )
            if f.full_size is not None and f.size < f.full_size:
                raise ValueError(f"unit plate '{name}' subsamples; several grouping factors need every unit")
        positions = torch.arange(self.base.global_dim)
        per_factor = {name: [] for name in names}
        local_sites = {name: [] for name in names}
        global_index = []
        for layout in self.base.global_layout:
            site = trace.nodes[layout.name]
            inside = [f for f in site["cond_indep_stack"] if f.name in names]
            block = positions[layout.slice].reshape(layout.shape)
            if not inside:
                global_index.append(block.reshape(-1))
                continue
            if len(inside) > 1:
                raise ValueError(
                    f"latent site '{layout.name}' sits in the unit plates {[f.name for f in inside]}; "
                    "a latent belongs to one grouping factor (an interaction, (1 | a:b), is a factor "
                    "of its own: a plate over the combinations)"
                )
            frame = inside[0]
            axis = frame.dim - layout.transform.domain.event_dim
            if block.dim() < -axis or block.shape[axis] != frame.size:
                raise ValueError(
                    f"latent site '{layout.name}' in plate '{frame.name}' does not extend along the "
                    f"plate's dim {frame.dim} (shape {tuple(site['value'].shape)})"
                )
            per_factor[frame.name].append(block.movedim(axis, 0).reshape(frame.size, -1))
            local_sites[frame.name].append(layout.name)
        for name in names:
            if not per_factor[name]:
                raise ValueError(f"unit plate '{name}' holds no latent sample site")
        #: per factor, the base coordinates of its units: ``(N_f, k_f)``
        self.unit_index = tuple(torch.cat(per_factor[name], dim=-1) for name in names)
        #: the local latent sites of each factor, by plate name
        self.factor_sites = {name: tuple(local_sites[name]) for name in names}
        self.global_index = torch.cat(global_index) if global_index else torch.zeros(0, dtype=torch.long)
        self._local_index = torch.cat([i.reshape(-1) for i in self.unit_index])
        self.global_dim = self.global_index.numel()
        self.latent_dim = self._local_index.numel()
        z = self.base.init_theta
        self.init_theta = z[self.global_index]
        self.init_y = z[self._local_index]

    # ------------------------------------------------------------------ layout
    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """Units per factor."""
        return tuple(i.shape[0] for i in self.unit_index)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        """Coordinates per unit, per factor."""
        return tuple(i.shape[1] for i in self.unit_index)

    @property
    def factor_offsets(self) -> tuple[int, ...]:
        """Where each factor's units start in ``x``."""
        offsets, at = [], 0
        for i in self.unit_index:
            offsets.append(at)
            at += i.numel()
        return tuple(offsets)

    @property
    def global_sites(self) -> tuple[str, ...]:
        local = {n for sites in self.factor_sites.values() for n in sites}
        return tuple(s.name for s in self.base.global_layout if s.name not in local)

    @property
    def global_layout(self):
        """The base view's layouts of the global sites (name, transform and
        unconstrained shape; their slices index the base coordinates)."""
        names = set(self.global_sites)
        return tuple(s for s in self.base.global_layout if s.name in names)

    def pack_globals(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Constrained values of the global sites to ``theta`` ``(p,)``."""
        missing = [n for n in self.global_sites if n not in values]
        if missing:
            raise ValueError(f"pack_globals() needs a value for every global site; missing {missing}")
        parts = [s.transform.inv(values[s.name]).reshape(-1) for s in self.global_layout]
        return torch.cat(parts) if parts else self.init_y.new_zeros(0)

    def unpack_unconstrained(self, theta: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained values of every latent site."""
        return self.base.unpack_unconstrained(self.assemble(theta, x), self._no_units(x))

    @property
    def local_sites(self) -> tuple[str, ...]:
        return tuple(n for sites in self.factor_sites.values() for n in sites)

    @property
    def param_sites(self) -> tuple[str, ...]:
        return self.base.param_sites

    @property
    def max_plate_nesting(self) -> int:
        """How many plate dims the model's sites use (Trace_ELBO's ``max_plate_nesting``)."""
        return self.base.max_plate_nesting

    @property
    def num_observations(self) -> int:
        return self.base.num_observations

    @property
    def dtype(self) -> torch.dtype:
        return self.init_theta.dtype if self.global_dim else self.init_y.dtype

    @property
    def device(self) -> torch.device:
        return self.init_y.device

    @property
    def args(self):
        return self.base.args

    @property
    def kwargs(self):
        return self.base.kwargs

    def with_args(self, *args, **kwargs) -> FactorView:
        """The same view of the model called with other arguments of the same shapes."""
        import copy

        view = copy.copy(self)
        view.base = self.base.with_args(*args, **kwargs)
        return view

    # -------------------------------------------------------------- density
    def assemble(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base view's flat coordinates from ``(theta, x)`` (differentiable)."""
        self._check(theta, x)
        z = x.new_zeros(self.base.global_dim)
        z = z.index_put((self.global_index.to(x.device),), theta)
        return z.index_put((self._local_index.to(x.device),), x)

    def log_joint(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Log joint density at unconstrained ``(theta, x)``, Jacobians
        included; a pure function of both."""
        return self.base.log_joint(self.assemble(theta, x), self._no_units(x))

    def terms(self, theta: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of the log density, elementwise (not summed), by site."""
        terms = self.base._terms(self.assemble(theta, x), self._no_units(x), None)
        return {name: t for name, (t, _) in terms.items()}

    def unpack(self, theta: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained values of every latent site."""
        return self.base.unpack(self.assemble(theta, x), self._no_units(x))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` as one ``(N_f, k_f)`` block per factor."""
        blocks, at = [], 0
        for i in self.unit_index:
            blocks.append(x[at : at + i.numel()].reshape(i.shape))
            at += i.numel()
        return tuple(blocks)

    def _no_units(self, x):
        return x.new_zeros(0, 0)

    def _check(self, theta, x):
        if theta.shape != (self.global_dim,):
            raise ValueError(f"theta must have shape ({self.global_dim},), got {tuple(theta.shape)}")
        if x.shape != (self.latent_dim,):
            raise ValueError(f"x must have shape ({self.latent_dim},), got {tuple(x.shape)}")
