"""Gaussian guides seen in one flat coordinate system, and the curvature of
log p in the same coordinates.

The curvature estimators (:mod:`curvi.taylor_cv`) need three things of a
Gaussian guide q = N(μ(φ), Σ(φ)) over the model's unconstrained latents: the
particles x it drew (differentiable in φ), its mean μ(φ), and enough of
Σ(φ) to form tr(H Σ(φ)) differentiably. Pyro's autoguides and curvi's
Laplace guides each store these differently; :func:`gaussian_view` reads
them into the flat layout of :class:`FlatLayout`:

* with a unit plate, the layout of :class:`curvi.ModelView` —
  ``x = [θ, y.flatten()]``, units-major — so the Hessian of log p is the
  block arrowhead of :func:`curvi.structured_hessian` (p + k backward
  passes whatever the number of units);
* without one, every latent site flattened in execution order, and a
  dense Hessian (one backward pass per coordinate).

Supported guides: :class:`~pyro.infer.autoguide.AutoNormal`,
:class:`~pyro.infer.autoguide.AutoDiagonalNormal`,
:class:`~pyro.infer.autoguide.AutoMultivariateNormal`,
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`,
:class:`curvi.LaplaceGuide` and :class:`curvi.AmortizedLaplaceGuide`. Pyro's
guides are asked for their Gaussian (``get_posterior``, ``_get_loc_and_scale``);
curvi's publish theirs in the guide trace
(:func:`curvi.guides.laplace_gaussian`), so their moments are read from the
trace of the call that drew the particles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from .arrowhead import ArrowheadPrecision, arrowhead_matvec
from .guides import LaplaceGuideBase, laplace_gaussian
from .hessian import structured_hessian
from .model import ModelView
from .tensor_ops import hessian_rows, symmetrize

SUPPORTED = (
    "AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
    "AutoLowRankMultivariateNormal, LaplaceGuide, AmortizedLaplaceGuide"
)


# --------------------------------------------------------------------- layout
class _Site(NamedTuple):
    name: str
    transform: torch.distributions.Transform
    shape: torch.Size  # unconstrained shape, unit axis included
    unit_axis: int | None


class FlatLayout:
    """Where each latent site's unconstrained value sits in a flat vector.

    ``FlatLayout.from_view(view)`` follows :meth:`curvi.ModelView.flatten`
    (globals, then the units' rows); ``FlatLayout.from_trace(trace)`` puts
    the latent sites of a model trace one after another, each flattened.
    """

    def __init__(self, sites: Iterable[_Site], *, view: ModelView | None = None):
        self.sites = tuple(sites)
        self.view = view
        self.dim = sum(s.shape.numel() for s in self.sites)

    @classmethod
    def from_view(cls, view: ModelView) -> FlatLayout:
        sites = [_Site(s.name, s.transform, s.shape, None) for s in view.global_layout]
        for s in view.local_layout:
            shape = list(s.shape)
            axis = len(shape) + 1 + s.unit_axis
            shape.insert(axis, view.num_units)
            sites.append(_Site(s.name, s.transform, torch.Size(shape), s.unit_axis))
        return cls(sites, view=view)

    @classmethod
    def from_trace(cls, trace: Trace) -> FlatLayout:
        sites = []
        for site in trace.nodes.values():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if site["infer"].get("is_auxiliary") or site["infer"].get("_deterministic"):
                continue
            transform = biject_to(site["fn"].support)
            sites.append(_Site(site["name"], transform, transform.inverse_shape(site["value"].shape), None))
        return cls(sites)

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flat ``(K, d)`` from unconstrained values ``name -> (K, *shape)``."""
        if self.view is None:
            return torch.cat([values[s.name].reshape(-1, s.shape.numel()) for s in self.sites], -1)
        theta, rows = [], []
        for s in self.sites:
            v = values[s.name]
            v = v.reshape((-1,) + s.shape)
            if s.unit_axis is None:
                theta.append(v.reshape(v.shape[0], -1))
            else:
                v = v.movedim(s.unit_axis, 1)
                rows.append(v.reshape(v.shape[0], v.shape[1], -1))
        y = torch.cat(rows, -1)
        parts = theta + [y.reshape(y.shape[0], -1)]
        return torch.cat(parts, -1)

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained site values from a flat ``(d,)`` vector."""
        if self.view is not None:
            return self.view.unpack_unconstrained(*self.view.split(x))
        values, offset = {}, 0
        for s in self.sites:
            n = s.shape.numel()
            values[s.name] = x[offset : offset + n].reshape(s.shape)
            offset += n
        return values

    def permutation(
        self, unpack_latent: Callable[[torch.Tensor], Iterable[tuple[Message, torch.Tensor]]]
    ) -> torch.Tensor:
        """Indices ``perm`` with ``flat = latent[..., perm]``, for a guide whose
        latent vector is unpacked by ``unpack_latent`` (an AutoContinuous)."""
        index = torch.arange(self.dim, dtype=torch.float64)
        values = {site["name"]: v for site, v in unpack_latent(index)}
        return self.pack({s.name: values[s.name] for s in self.sites})[0].round().long()


# ------------------------------------------------------------------ curvature
class Curvature:
    """log p, its gradient ``g`` and Hessian ``H`` at a point of the flat layout.

    ``H`` is kept as arrowhead blocks ``(A, B, D)`` with a unit plate and as a
    dense matrix without one; :meth:`matvec` and :meth:`diag` hide which.
    """

    def __init__(
        self,
        log_prob: torch.Tensor,
        grad: torch.Tensor,
        *,
        blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        dense: torch.Tensor | None = None,
        layout: FlatLayout | None = None,
    ):
        self.log_prob, self.grad = log_prob, grad
        self.blocks, self.dense, self.layout = blocks, dense, layout

    @classmethod
    def at(
        cls,
        layout: FlatLayout,
        x: torch.Tensor,
        log_density: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Curvature:
        """The curvature at ``x`` (detached), through ``layout.view`` or, without
        one, by dense autograd of ``log_density(x)``."""
        x = x.detach()
        if layout.view is not None:
            theta, y = layout.view.split(x)
            H = structured_hessian(layout.view, theta, y)
            grad = torch.cat([H.grad_theta, H.grad_y.reshape(-1)])
            return cls(H.log_prob.detach(), grad.detach(), blocks=(H.A, H.B, H.D), layout=layout)
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            value = log_density(x)
            (grad,) = torch.autograd.grad(value, x, create_graph=True)
            H = hessian_rows(grad, x, torch.eye(x.numel(), dtype=x.dtype, device=x.device))
        H = symmetrize(H)
        return cls(value.detach(), grad.detach(), dense=H.detach(), layout=layout)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for ``v`` of shape ``(..., d)``."""
        if self.dense is not None:
            return v @ self.dense
        view = self.layout.view
        A, B, D = self.blocks
        p = view.global_dim
        theta, y = v[..., :p], v[..., p:].reshape(v.shape[:-1] + (-1, view.local_dim))
        out_theta, out_y = arrowhead_matvec(A, B, D, (theta, y))
        return torch.cat([out_theta, out_y.reshape(v.shape[:-1] + (-1,))], -1)

    def diag(self) -> torch.Tensor:
        """The diagonal of ``H``, ``(d,)``."""
        if self.dense is not None:
            return self.dense.diagonal()
        A, _, D = self.blocks
        return torch.cat([A.diagonal(), D.diagonal(dim1=-2, dim2=-1).reshape(-1)])


# ---------------------------------------------------------- covariance forms
class DiagonalCov(NamedTuple):
    """Σ = diag(var)."""

    var: torch.Tensor

    def trace_with(self, H: Curvature) -> torch.Tensor:
        return (H.diag() * self.var).sum()


class FactorCov(NamedTuple):
    """Σ = L Lᵀ for a ``(d, r)`` factor L (a Cholesky factor when r = d)."""

    factor: torch.Tensor

    def trace_with(self, H: Curvature) -> torch.Tensor:
        columns = self.factor.T
        return (columns * H.matvec(columns)).sum()


class LowRankCov(NamedTuple):
    """Σ = W Wᵀ + diag(cov_diag)."""

    cov_factor: torch.Tensor
    cov_diag: torch.Tensor

    def trace_with(self, H: Curvature) -> torch.Tensor:
        return FactorCov(self.cov_factor).trace_with(H) + DiagonalCov(self.cov_diag).trace_with(H)


class ArrowheadCov(NamedTuple):
    """Σ = P⁻¹ for an arrowhead precision P (the covariance of curvi's
    guides), through :meth:`~curvi.arrowhead.ArrowheadPrecision.covariance_blocks`."""

    precision: ArrowheadPrecision

    def trace_with(self, H: Curvature) -> torch.Tensor:
        if H.blocks is None:
            raise ValueError("an arrowhead covariance needs the arrowhead Hessian of a unit plate")
        A, B, D = H.blocks
        cov_theta, cov_y_theta, cov_y = self.precision.covariance_blocks()
        return (A * cov_theta).sum() + 2 * (B * cov_y_theta).sum() + (D * cov_y).sum()


# ------------------------------------------------------------- guide adapters
class GaussianView:
    """One guide's particles, mean and covariance in a :class:`FlatLayout`.

    :meth:`particles` reads the particles of a guide trace; :meth:`moments`
    gives ``(mean, cov)`` as differentiable functions of the guide's
    parameters (those of the call that made ``guide_trace``, which curvi's
    Laplace guides need; Pyro's guides give their current ones);
    :meth:`log_q_detached` is the log density of the trace's Gaussian sites
    with the guide's parameters held fixed (for sticking the landing).
    """

    def __init__(self, guide: AutoGuide, layout: FlatLayout):
        self.guide, self.layout = guide, layout

    def particles(self, guide_trace: Trace) -> torch.Tensor:
        raise NotImplementedError

    def moments(
        self, guide_trace: Trace | None = None
    ) -> tuple[torch.Tensor, DiagonalCov | FactorCov | LowRankCov | ArrowheadCov]:
        raise NotImplementedError

    def gaussian_sites(self, guide_trace: Trace) -> list[str]:
        """Names of the guide trace's Gaussian (auxiliary) sites."""
        raise NotImplementedError

    def log_q_detached(self, guide_trace: Trace) -> torch.Tensor:
        total = 0.0
        for name in self.gaussian_sites(guide_trace):
            site = guide_trace.nodes[name]
            log_q = _detached(site["fn"], name).log_prob(site["value"])
            total = total + _scaled_sum(log_q, site)
        return total


class _AutoNormalView(GaussianView):
    def gaussian_sites(self, guide_trace):
        return [s.name + "_unconstrained" for s in self.layout.sites]

    def particles(self, guide_trace):
        return self.layout.pack(
            {s.name: guide_trace.nodes[s.name + "_unconstrained"]["value"] for s in self.layout.sites}
        )

    def moments(self, guide_trace=None):
        locs, scales = {}, {}
        for s in self.layout.sites:
            locs[s.name], scales[s.name] = self.guide._get_loc_and_scale(s.name)
        return self.layout.pack(locs)[0], DiagonalCov(self.layout.pack(scales)[0] ** 2)


class _AutoContinuousView(GaussianView):
    def __init__(self, guide, layout):
        super().__init__(guide, layout)
        self.perm = layout.permutation(guide._unpack_latent).to(guide.loc.device)
        self.site = f"_{guide._pyro_name}_latent"

    def gaussian_sites(self, guide_trace):
        return [self.site]

    def particles(self, guide_trace):
        latent = guide_trace.nodes[self.site]["value"]
        return latent.reshape(-1, self.layout.dim)[:, self.perm]

    def moments(self, guide_trace=None):
        q = self.guide.get_posterior()
        perm = self.perm
        if isinstance(q, dist.LowRankMultivariateNormal):
            return q.loc[perm], LowRankCov(q.cov_factor[perm], q.cov_diag[perm])
        if isinstance(q, dist.MultivariateNormal):
            return q.loc[perm], FactorCov(q.scale_tril[perm])
        base = q.base_dist if isinstance(q, dist.Independent) else q
        return base.loc[perm], DiagonalCov(base.scale[perm] ** 2)


class _LaplaceView(GaussianView):
    """curvi's Laplace guides: everything from the trace's
    :class:`~curvi.posterior.LaplaceGaussian`."""

    def gaussian_sites(self, guide_trace):
        name = self.guide._pyro_name
        return [f"_{name}_global", f"_{name}_local"]

    def _gaussian(self, guide_trace):
        q = None if guide_trace is None else laplace_gaussian(guide_trace)
        if q is None:
            raise ValueError("the moments of a Laplace guide are read from a trace of it; pass guide_trace")
        return q

    def particles(self, guide_trace):
        view = self.layout.view
        theta_site, y_site = self.gaussian_sites(guide_trace)
        theta = guide_trace.nodes[theta_site]["value"].reshape(-1, view.global_dim)
        y = guide_trace.nodes[y_site]["value"].reshape(theta.shape[0], -1)
        return torch.cat([theta, y], -1)

    def moments(self, guide_trace=None):
        q = self._gaussian(guide_trace)
        return torch.cat([q.theta_hat, q.y_hat.reshape(-1)]), ArrowheadCov(q.precision)

    def log_q_detached(self, guide_trace):
        q = self._gaussian(guide_trace).detach()
        theta_site, y_site = (guide_trace.nodes[n] for n in self.gaussian_sites(guide_trace))
        theta, y = theta_site["value"], y_site["value"]
        log_q = q.marginal_global().log_prob(theta)
        log_q_y = q.conditional_local(theta.reshape(-1, theta.shape[-1])).log_prob(
            y.reshape((-1,) + tuple(q.y_hat.shape))
        )
        return _scaled_sum(log_q, theta_site) + _scaled_sum(log_q_y.reshape(y.shape[:-1]), y_site)


def is_supported(guide: object) -> bool:
    """Whether :func:`gaussian_view` can read ``guide``."""
    return isinstance(
        guide,
        (
            LaplaceGuideBase,
            AutoNormal,
            AutoDiagonalNormal,
            AutoMultivariateNormal,
            AutoLowRankMultivariateNormal,
        ),
    )


def gaussian_view(guide: AutoGuide, layout: FlatLayout) -> GaussianView:
    """The :class:`GaussianView` of ``guide`` in ``layout`` (see the module
    docstring for the supported guides)."""
    if isinstance(guide, LaplaceGuideBase):
        if layout.view is None:
            raise ValueError("curvi's Laplace guides need the layout of their unit plate")
        return _LaplaceView(guide, layout)
    if isinstance(guide, AutoNormal):
        return _AutoNormalView(guide, layout)
    if isinstance(guide, (AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal)):
        return _AutoContinuousView(guide, layout)
    raise ValueError(
        f"the curvature control variate and sticking the landing need a Gaussian guide "
        f"({SUPPORTED}); got {type(guide).__name__}"
    )


def flat_log_density(
    model: Callable, layout: FlatLayout, args: tuple, kwargs: dict
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> log p`` of ``model`` at flat unconstrained ``x`` ``(d,)``, the
    constraint Jacobians included (the dense route; with a unit plate use
    :meth:`curvi.ModelView.log_joint`)."""

    def log_density(x):
        values, log_jac = {}, 0.0
        for name, u in layout.unpack(x).items():
            site = next(s for s in layout.sites if s.name == name)
            value = site.transform(u)
            values[name] = value
            log_jac = log_jac + site.transform.log_abs_det_jacobian(u, value).sum()
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
        return trace.log_prob_sum() + log_jac

    return log_density


def batched_log_density(
    model: Callable, layout: FlatLayout, args: tuple, kwargs: dict, max_plate_nesting: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> (log p(x₁), …, log p(x_K))`` for flat unconstrained points ``x``
    of shape ``(K, d)`` (layouts without a unit plate), in one vectorised run
    of the model under a plate of the points left of its
    ``max_plate_nesting`` plates (the model must broadcast like it does under
    ``Trace_ELBO(vectorize_particles=True)``). Each value depends on its own
    point only, so the Hessian of their sum is block diagonal in the points.
    """
    point_dim = -max_plate_nesting - 1

    def log_density(x):
        K = x.shape[0]
        values, log_jac, offset = {}, 0.0, 0
        for site in layout.sites:
            n = site.shape.numel()
            u = x[:, offset : offset + n].reshape((K,) + site.shape)
            offset += n
            value = site.transform(u)
            jac = site.transform.log_abs_det_jacobian(u, value)
            log_jac = log_jac + jac.reshape(K, -1).sum(-1)
            batch_dims = len(site.shape) - site.transform.codomain.event_dim
            pad = max_plate_nesting - batch_dims
            if pad < 0:
                raise ValueError(f"site '{site.name}' has more batch dims than max_plate_nesting")
            values[site.name] = value.reshape((K,) + (1,) * pad + site.shape)
        with pyro.validation_enabled(False), pyro.plate("_curvi_points", K, dim=point_dim):
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        total = log_jac
        for node in trace.nodes.values():
            if node["type"] == "sample":
                lp = node["log_prob"]
                lp = lp.reshape((1,) * (max_plate_nesting + 1 - lp.dim()) + lp.shape)
                total = total + lp.reshape(lp.shape[: lp.dim() - max_plate_nesting] + (-1,)).sum(-1)
        return total.expand(K) if total.dim() == 0 else total.reshape(K)

    return log_density


# -------------------------------------------------------------------- helpers
def _detached(fn, name):
    """The same Gaussian with its parameters detached from the graph."""
    if isinstance(fn, dist.Independent):
        return dist.Independent(_detached(fn.base_dist, name), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach())
    if isinstance(fn, dist.LowRankMultivariateNormal):
        return dist.LowRankMultivariateNormal(
            fn.loc.detach(), fn._unbroadcasted_cov_factor.detach(), fn._unbroadcasted_cov_diag.detach()
        )
    if isinstance(fn, dist.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn._unbroadcasted_scale_tril.detach())
    raise ValueError(f"sticking the landing needs a Gaussian at guide site '{name}', got {type(fn).__name__}")


def _scaled_sum(log_q, site):
    scale = site["scale"]
    if site["mask"] is not None:
        log_q = log_q * site["mask"]
    return (scale * log_q).sum()
