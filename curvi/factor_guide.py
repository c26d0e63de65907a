"""The amortized Laplace guide for a model with several grouping factors.

``AmortizedLaplaceGuide(model, unit_plate=("subjects", "items"))`` returns a
:class:`FactorLaplaceGuide`. Its one parameter is θ̂, the mean of

    q(θ) = N(θ̂, S⁻¹),   S = −∇²_θ log p̃(θ̂, z),

the curvature of the Laplace marginal in the globals (as TMB and INLA use
for θ; the ``global_precision="marginal"`` of the one-plate guide), and the
units given θ are their joint Laplace conditional ``N(x̂(θ), (−H)⁻¹)``, with
x̂(θ) solved jointly by sparse Newton and H the sparse Hessian
(:mod:`curvi.sparse_laplace`). It is trained on the *collapsed* ELBO
``E_q(θ)[log p̃(θ, z)] + H[q(θ)]`` (:class:`~curvi.particles.CollapsedELBO`,
its :meth:`~FactorLaplaceGuide.default_loss`), whose gradient in θ̂ is exact
through the units' joint modes and their log-determinant; ``curvi.fit``
runs sample-average Newton on it (:class:`~curvi.laplace_newton.LaplaceNewton`).
S is held while θ̂ has not moved and is a constant in the gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam

from .arrowhead import PrecisionCholeskyNormal
from .factors import FactorView
from .marginal import laplace_hessian
from .modes import warn_unconverged
from .posterior import INFER_KEY
from .sparse_laplace import solve_joint_modes

__all__ = ["FactorGaussian", "FactorLaplaceGuide"]


class FactorGaussian:
    """What a :class:`FactorLaplaceGuide` publishes in its trace (as the
    one-plate guides publish a :class:`~curvi.posterior.LaplaceGaussian`):
    q(θ)'s mean and precision, and the units' joint modes at θ̂."""

    subsampled = False

    def __init__(
        self, theta_hat: torch.Tensor, global_precision: torch.Tensor, y_hat: torch.Tensor, epoch: int
    ):
        self.theta_hat, self.global_precision, self.y_hat = theta_hat, global_precision, y_hat
        #: how many times S has been recomputed (a line search needs one smooth ELBO: one epoch)
        self.epoch = epoch

    def marginal_global(self) -> PrecisionCholeskyNormal:
        """q(θ) as a distribution (reparameterised in θ̂)."""
        L = torch.linalg.cholesky(self.global_precision)
        return PrecisionCholeskyNormal(self.theta_hat, L, validate_args=False)


class FactorLaplaceGuide(AutoGuide):
    """The amortized Laplace guide for several grouping factors (module
    docstring); made by ``AmortizedLaplaceGuide(model, unit_plate=(...))``.

    Usage::

        import pyro, pyro.distributions as dist
        import curvi

        def model(subject, item, obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("subjects", 6):
                a = pyro.sample("a", dist.Normal(0.0, 1.0))
            with pyro.plate("items", 4):
                b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", len(obs)):
                pyro.sample("z", dist.Poisson((mu + a[subject] + b[item]).exp()), obs=obs)

        subject, item = torch.arange(24) % 6, torch.arange(24) // 6
        obs = torch.poisson(torch.full((24,), 2.0))
        guide = curvi.AmortizedLaplaceGuide(model, unit_plate=("subjects", "items"))
        result = curvi.fit(model, guide, subject, item, obs, progress=False)
        guide.median(subject, item, obs)["b"].shape     # (4,)

    :param callable model: a Pyro model with several unit plates.
    :param tuple unit_plate: the plates of the grouping factors.
    :param callable init_loc_fn: init strategy of the initial θ̂ and modes.
    :param float xtol: the joint Newton solve's step tolerance.
    :param int max_iter: its iteration cap.
    """

    def __init__(
        self,
        model: Callable,
        *,
        unit_plate: tuple[str, ...],
        init_loc_fn: Callable = init_to_median,
        xtol: float | None = None,
        max_iter: int = 50,
        create_plates: Callable | None = None,
    ):
        self.unit_plate, self.init_loc_fn = tuple(unit_plate), init_loc_fn
        self.xtol, self.max_iter = xtol, max_iter
        self.view = None
        self._held = 0
        self._drawing_units = True
        self._precision_at = None  # (θ̂, S) of the last curvature
        self._epoch = 0  # how many times S has been recomputed
        super().__init__(model, create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.view = FactorView(
            self.model, *args, unit_plate=self.unit_plate, init_loc_fn=self.init_loc_fn, **kwargs
        )
        self.loc_global = PyroParam(self.view.init_theta.clone())
        self.register_buffer("mode_cache", self.view.init_y.clone())

    # ------------------------------------------------------------ the parts
    def _modes(self, view, theta):
        modes = solve_joint_modes(
            view, theta.detach(), self.mode_cache, xtol=self.xtol, max_iter=self.max_iter
        )
        warn_unconverged(modes, stacklevel=4)
        return modes

    def _global_precision(self, view, theta_hat):
        """S at θ̂: the negative Hessian of the Laplace marginal (central
        differences of its exact gradient), eigenvalues made positive
        (``|λ|``, floored) where θ̂ is far from the mode; held while θ̂ has
        not moved, or inside :meth:`holding_global_precision`."""
        cached = self._precision_at
        if cached is not None and (self._held or torch.equal(cached[0], theta_hat)):
            return cached[1]
        modes = self._modes(view, theta_hat)
        self.mode_cache = modes.y + modes.step
        S = -laplace_hessian(view, theta_hat, self.mode_cache)
        lam, Q = torch.linalg.eigh(S)
        floor = torch.finfo(S.dtype).eps ** 0.5 * lam.abs().max().clamp_min(1.0)
        S = (Q * lam.abs().clamp_min(floor)) @ Q.mT
        self._precision_at = (theta_hat.clone(), S)
        self._epoch += 1
        return S

    @contextlib.contextmanager
    def holding_global_precision(self) -> Iterator[None]:
        """Hold S at its current value (LaplaceNewton's blocks do)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    @contextlib.contextmanager
    def without_unit_draws(self) -> Iterator[None]:
        """The units' sites at their modes at θ̂ instead of drawn (the
        collapsed ELBO does not use them)."""
        previous, self._drawing_units = self._drawing_units, False
        try:
            yield
        finally:
            self._drawing_units = previous

    # ------------------------------------------------------------ the guide
    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every latent site: θ from q(θ), the units from their joint
        Laplace conditional at that θ."""
        with torch.enable_grad():
            if self.prototype_trace is None:
                self._setup_prototype(*args, **kwargs)
            view = self.view.with_args(*args, **kwargs)
            theta_hat = self.loc_global
            S = self._global_precision(view, theta_hat.detach())
            q = FactorGaussian(theta_hat, S, self.mode_cache, self._epoch)
        theta = pyro.sample(
            f"_{self._pyro_name}_global", q.marginal_global(), infer={"is_auxiliary": True, INFER_KEY: q}
        )
        batch = theta.shape[:-1]
        thetas = theta.reshape(-1, view.global_dim)
        with torch.no_grad():
            xs = torch.stack([self._draw_units(view, t) for t in thetas])
        return self._sample_sites(view, thetas, xs, batch, self._create_plates(*args, **kwargs))

    def _draw_units(self, view, theta):
        if not self._drawing_units:
            return self.mode_cache
        modes = self._modes(view, theta)
        x = modes.y + modes.step
        eps = torch.randn(x.shape, dtype=x.dtype).cpu().numpy()
        noise = modes.pattern.lower.factor(modes.precision).draw(eps)
        return x + torch.as_tensor(noise, dtype=x.dtype, device=x.device)

    def _sample_sites(self, view, thetas, xs, batch, plates):
        """A ``Delta`` site per model site at the constrained value, with the
        log density of the constraint Jacobian, aligned to the particle plates."""
        layouts = {s.name: s for s in view.base.global_layout}
        unconstrained = [view.unpack_unconstrained(t, x) for t, x in zip(thetas, xs)]
        result = {}
        for name in view.global_sites + view.local_sites:
            site = self.prototype_trace.nodes[name]
            layout, event_dim = layouts[name], site["fn"].event_dim
            u = torch.stack([v[name] for v in unconstrained])
            x = layout.transform(u)
            log_density = layout.transform.inv.log_abs_det_jacobian(x, u)
            log_density = sum_rightmost(log_density, log_density.dim() - x.dim() + event_dim)
            site_shape = x.shape[1:]
            num_batch_dims = len(site_shape) - event_dim
            prefix = batch[: len(batch) - num_batch_dims] if batch else ()
            x = x.reshape(prefix + site_shape)
            if torch.is_tensor(log_density):
                log_density = log_density.reshape(prefix + site_shape[:num_batch_dims])
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, dist.Delta(x, log_density=log_density, event_dim=event_dim))
        return result

    # ------------------------------------------------------- for curvi.fit
    @property
    def collapsed_nodes(self) -> int | None:
        """1: the collapsed ELBO integrates the units by Laplace (jointly)."""
        return None if self.prototype_trace is None else 1

    def collapsed_log_marginal(self, view, theta, y, *, create_graph):
        """The units integrated out jointly: the sparse Laplace marginal."""
        from .sparse_laplace import sparse_log_marginal

        return sparse_log_marginal(
            view, theta, y, xtol=self.xtol, max_iter=self.max_iter, create_graph=create_graph
        )

    def default_loss(self, *args, **kwargs) -> pyro.infer.ELBO:
        """The collapsed ELBO (:class:`~curvi.particles.CollapsedELBO`)."""
        from .particles import CollapsedELBO

        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return CollapsedELBO()

    def default_optim(self, *args, **kwargs) -> pyro.optim.PyroOptim:
        """Sample-average Newton on θ̂ (:class:`~curvi.laplace_newton.LaplaceNewton`)."""
        from .laplace_newton import LaplaceNewton

        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return LaplaceNewton()

    # ---------------------------------------------------------- read-outs
    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """θ̂ and the units' joint modes at θ̂, constrained, by site."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        view = self.view.with_args(*args, **kwargs)
        theta = self.loc_global.detach()
        with torch.enable_grad():
            modes = self._modes(view, theta)
        return view.unpack(theta, modes.y + modes.step)
