"""The Laplace guides' Gaussian: as one value, and read out by site.

:class:`LaplaceGaussian` is what one call of a Laplace guide draws from,

    q(θ, y) = N((θ̂, ŷ), P⁻¹):   q(θ) = N(θ̂, S⁻¹),   q(yᵢ | θ) = N(ŷᵢ − Mᵢ(θ − θ̂), Dᵢ⁻¹),

held as its mean and one :class:`~curvi.arrowhead.ArrowheadPrecision` ``P``
whose Schur complement is ``S`` and whose ``Mᵢ = Dᵢ⁻¹Bᵢ`` (docs/design.md
§2). Everything else -- draws, densities, the site distributions, the
marginal variances -- comes from ``P``'s factors. The guides publish it in
their trace: the ``infer`` dict of their global site holds it under the key
``"laplace_gaussian"``, and :func:`laplace_gaussian` (also importable from
:mod:`curvi.guides`) reads it from a guide trace.

:class:`LaplacePosterior` is what the guides' ``laplace_posterior`` returns: a
:class:`LaplaceGaussian` over all units and the
:class:`~curvi.model.ModelView` that maps its coordinates to sites.
Marginal standard deviations come blockwise from the arrowhead (never a
dense covariance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.trace_struct import Trace
from torch.distributions import constraints

from .arrowhead import ArrowheadPrecision, PrecisionCholeskyNormal
from .model import ModelView


class LaplaceGaussian:
    """``N((θ̂, ŷ), P⁻¹)`` over the globals θ and the units' latents y of
    one batch, in the arrowhead factorisation.

    The one value a Laplace guide computes per call (published in its
    trace, :func:`laplace_gaussian`), and what
    :class:`LaplacePosterior` reads out. ``precision`` is the precision of
    exactly the Gaussian the guide samples: its Schur complement is the
    precision ``S`` of q(θ) actually used (under a subsampled unit plate the
    guide's running average, with ``global_precision="marginal"`` the
    marginal curvature), its conditionals are the ``q(yᵢ | θ)``. Draws use
    its Cholesky factors; nothing is factorised again. All attributes keep
    their graph (differentiable in the guide's parameters).

    Usage::

        from curvi.arrowhead import ArrowheadPrecision

        P = ArrowheadPrecision(2 * torch.eye(2), 0.3 * torch.ones(4, 1, 2),
                               torch.ones(4, 1, 1))
        q = LaplaceGaussian(torch.zeros(2), torch.ones(4, 1), P)
        theta, y = q.sample((torch.randn(10, 2), torch.randn(10, 4, 1)))
        q.log_prob((theta, y)).shape, q.entropy()      # (10,), a scalar
        q.conditional_local(theta).mean.shape         # (10, 4, 1): ŷ − M(θ − θ̂)
        q.marginal_variances()                        # (var θ (2,), var y (4, 1))

    :param torch.Tensor theta_hat: the mean θ̂ of θ, ``(p,)``.
    :param torch.Tensor y_hat: the mean ŷ of the batch's units, ``(n, k)``.
    :param ArrowheadPrecision precision: ``P`` over ``(θ, y)``.
    :param bool subsampled: whether the unit plate was subsampled (then the
        batch is ``n`` of the plate's units).
    :param torch.Tensor units: the batch's unit indices, or ``None`` for all.
    :param int epoch: how many times the guide has changed the rule by which
        it computes ``S`` from θ̂ (the ``global_precision="marginal"``
        curvature is recomputed when θ̂ has moved far): two Gaussians of one
        guide with the same epoch come from one smooth function of θ̂, which
        a line search on the ELBO relies on.

    :ivar torch.Tensor theta_hat: θ̂, ``(p,)``.
    :ivar torch.Tensor y_hat: ŷ, ``(n, k)``.
    :ivar ArrowheadPrecision precision: ``P``.
    :ivar bool subsampled: whether the unit plate was subsampled.
    :ivar units: the unit indices of the batch, or ``None``.
    :ivar int epoch: as the parameter.
    :ivar torch.Tensor global_precision: ``S``, the precision of q(θ),
        ``(p, p)`` (``precision.schur``; differentiable).
    :ivar torch.Tensor local_precision: the ``Dᵢ``, ``(n, k, k)``.
    :ivar torch.Tensor M: the ``Mᵢ = Dᵢ⁻¹Bᵢ``, ``(n, k, p)``.
    """

    def __init__(
        self,
        theta_hat: torch.Tensor,
        y_hat: torch.Tensor,
        precision: ArrowheadPrecision,
        *,
        subsampled: bool = False,
        units: torch.Tensor | None = None,
        epoch: int = 0,
    ):
        if tuple(theta_hat.shape) != (precision.global_dim,) or tuple(y_hat.shape) != (
            precision.num_units,
            precision.local_dim,
        ):
            raise ValueError(
                f"precision is over {precision.global_dim} globals and {precision.num_units} units "
                f"of dimension {precision.local_dim}, but the mean has shapes "
                f"{tuple(theta_hat.shape)} and {tuple(y_hat.shape)}"
            )
        self.theta_hat, self.y_hat, self.precision = theta_hat, y_hat, precision
        self.subsampled, self.units, self.epoch = bool(subsampled), units, int(epoch)

    def __repr__(self):
        P = self.precision
        return (
            f"LaplaceGaussian(global_dim={P.global_dim}, num_units={P.num_units}, "
            f"local_dim={P.local_dim}, subsampled={self.subsampled})"
        )

    # ------------------------------------------------------------- the parts
    @property
    def global_precision(self) -> torch.Tensor:
        """``S``, the precision of q(θ), ``(p, p)``."""
        return self.precision.schur

    @property
    def local_precision(self) -> torch.Tensor:
        """``Dᵢ``, the precision of each q(yᵢ | θ), ``(n, k, k)``."""
        return self.precision.D

    @property
    def M(self) -> torch.Tensor:
        """``Mᵢ = Dᵢ⁻¹Bᵢ`` of each unit, ``(n, k, p)``: q(yᵢ | θ) has mean ``ŷᵢ − Mᵢ(θ − θ̂)``."""
        return self.precision.M

    @property
    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair ``(θ̂, ŷ)``."""
        return self.theta_hat, self.y_hat

    def detach(self) -> LaplaceGaussian:
        """The same Gaussian with every tensor detached from the graph."""
        return LaplaceGaussian(
            self.theta_hat.detach(),
            self.y_hat.detach(),
            self.precision.detach(),
            subsampled=self.subsampled,
            units=self.units,
        )

    # ------------------------------------------------------- the distribution
    def sample(self, eps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reparameterised draw ``(θ, y)`` for a standard-normal pair ``eps``
        of shapes ``(..., p)``, ``(..., n, k)``: ``θ = θ̂ + L_S⁻ᵀ ε_θ``, then
        ``yᵢ`` from q(yᵢ | θ) (:meth:`curvi.arrowhead.ArrowheadPrecision.sample`)."""
        delta_theta, delta_y = self.precision.sample(eps)
        return self.theta_hat + delta_theta, self.y_hat + delta_y

    def log_prob(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``log q(θ, y) = log q(θ) + Σᵢ log q(yᵢ | θ)`` at a pair ``x``, with all constants."""
        return self.precision.log_prob(x, self.mean)

    def entropy(self) -> torch.Tensor:
        """The entropy of q over ``(θ, y)``, a scalar."""
        return self.precision.entropy()

    def marginal_global(self) -> PrecisionCholeskyNormal:
        """q(θ) = N(θ̂, S⁻¹), from the factor of ``S``."""
        # the factor of a Cholesky decomposition: valid by construction
        return PrecisionCholeskyNormal(self.theta_hat, self.precision.cholesky.L_S, validate_args=False)

    def conditional_mean(self, theta: torch.Tensor) -> torch.Tensor:
        """The mean ``ŷᵢ − Mᵢ(θ − θ̂)`` of q(yᵢ | θ) for ``theta`` of shape
        ``(..., p)``: ``(..., n, k)``."""
        return self.y_hat + self.precision.conditional_mean(theta - self.theta_hat)

    def conditional_local(self, theta: torch.Tensor) -> PrecisionCholeskyNormal:
        """q(yᵢ | θ) = N(ŷᵢ − Mᵢ(θ − θ̂), Dᵢ⁻¹) for ``theta`` of shape ``(..., p)``:
        batch shape ``(..., n)``, event shape ``(k,)``, precision ``Dᵢ``."""
        return PrecisionCholeskyNormal(
            self.conditional_mean(theta), self.precision.cholesky.L_D, validate_args=False
        )

    def marginal_variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal variances ``(var_theta (p,), var_y (n, k))``:
        the diagonals of ``S⁻¹`` and of ``Dᵢ⁻¹ + Mᵢ S⁻¹ Mᵢᵀ``."""
        return self.precision.marginal_variances()

    def as_distribution(self) -> ArrowheadNormal:
        """This Gaussian as a torch ``Distribution`` over the flat vector
        ``[θ, y.flatten()]`` (:class:`ArrowheadNormal`)."""
        return ArrowheadNormal(self)


class ArrowheadNormal(TorchDistribution):
    """A :class:`LaplaceGaussian` as a Pyro/torch distribution over the flat
    unconstrained vector ``x = [θ, y.flatten()]`` (units-major, as
    :meth:`curvi.ModelView.flatten`), event shape ``(p + n k,)``: what the
    Laplace guides' ``get_posterior()`` returns, as every Pyro autoguide's
    returns a distribution over its unconstrained latents.

    Draws, densities, mean, variance and entropy use the arrowhead factors
    (cost linear in n); ``precision_matrix`` and ``covariance_matrix`` build
    the dense ``(p + n k)²`` matrices, for small models and tests.
    :attr:`gaussian` keeps the structured value.

    Usage::

        from curvi.arrowhead import ArrowheadPrecision

        P = ArrowheadPrecision(2 * torch.eye(2), 0.3 * torch.ones(4, 1, 2), torch.ones(4, 1, 1))
        q = ArrowheadNormal(LaplaceGaussian(torch.zeros(2), torch.ones(4, 1), P))
        x = q.rsample((10,))               # (10, 6)
        q.log_prob(x).shape, q.mean.shape  # (10,), (6,)
        torch.allclose(q.covariance_matrix, torch.linalg.inv(P.to_dense()))   # True
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, gaussian: LaplaceGaussian, validate_args: bool | None = None):
        self.gaussian = gaussian
        self._p = gaussian.theta_hat.shape[0]
        self._n, self._k = gaussian.y_hat.shape
        super().__init__(torch.Size(), torch.Size([self._p + self._n * self._k]), validate_args=validate_args)

    def _split(self, x):
        batch = x.shape[:-1]
        theta, y = x[..., : self._p], x[..., self._p :]
        return theta.reshape(-1, self._p), y.reshape(-1, self._n, self._k), batch

    @property
    def mean(self) -> torch.Tensor:
        return torch.cat([self.gaussian.theta_hat, self.gaussian.y_hat.reshape(-1)])

    @property
    def variance(self) -> torch.Tensor:
        var_theta, var_y = self.gaussian.marginal_variances()
        return torch.cat([var_theta, var_y.reshape(-1)])

    @property
    def precision_matrix(self) -> torch.Tensor:
        return self.gaussian.precision.to_dense()

    @property
    def covariance_matrix(self) -> torch.Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(self.precision_matrix))

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = torch.Size(sample_shape)
        like = self.gaussian.y_hat
        eps_theta = torch.randn(shape.numel(), self._p, dtype=like.dtype, device=like.device)
        eps_y = torch.randn(shape.numel(), self._n, self._k, dtype=like.dtype, device=like.device)
        theta, y = self.gaussian.sample((eps_theta, eps_y))
        return torch.cat([theta, y.reshape(theta.shape[0], -1)], -1).reshape(shape + self.event_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta, y, batch = self._split(value)
        return self.gaussian.log_prob((theta, y)).reshape(batch)

    def entropy(self) -> torch.Tensor:
        return self.gaussian.entropy()


#: the key of the global auxiliary site's ``infer`` dict that holds the
#: call's :class:`~curvi.posterior.LaplaceGaussian`
INFER_KEY = "laplace_gaussian"
#: the key of the unit auxiliary site's ``infer`` dict that holds the global
#: indices of its units and the unit plate's name (what
#: :class:`~curvi.laplace_newton.FixedNoise` keys their noise by)
UNITS_KEY = "curvi_units"


def laplace_gaussian(guide_trace: Trace) -> LaplaceGaussian | None:
    """The :class:`~curvi.posterior.LaplaceGaussian` a Laplace guide drew
    from in ``guide_trace`` (with its graph), or ``None`` when the trace has
    no Laplace guide site.

    Usage::

        import pyro, pyro.distributions as dist

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

        obs = torch.randn(6, 3)
        from curvi import AmortizedLaplaceGuide
        guide = AmortizedLaplaceGuide(model, unit_plate="groups")
        trace = pyro.poutine.trace(guide).get_trace(obs)
        q = laplace_gaussian(trace)
        q.theta_hat, q.global_precision, q.y_hat.shape, q.subsampled   # (1,), (1, 1), (6, 1), False

    :param pyro.poutine.Trace guide_trace: a trace of the guide.
    :raises ValueError: when the trace holds the sites of more than one Laplace guide.
    """
    found = [
        (name, site["infer"][INFER_KEY])
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and INFER_KEY in (site.get("infer") or {})
    ]
    if len(found) > 1:
        raise ValueError(
            f"the trace holds the Gaussians of {len(found)} Laplace guides (sites "
            f"{[name for name, _ in found]}); read the site's infer[{INFER_KEY!r}] directly"
        )
    return found[0][1] if found else None


class LaplacePosterior:
    """``N((θ̂, ŷ), P⁻¹)`` in the unconstrained coordinates of a :class:`ModelView`.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView, structured_hessian

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 3):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("z", dist.Normal(u, 0.5), obs=torch.tensor([0.0, 1.0, 2.0]))

        view = ModelView(model, unit_plate="groups")
        theta, y = view.init_theta, view.init_y
        P = structured_hessian(view, theta, y).precision()
        post = LaplacePosterior(view, theta, y, P)
        post.sample(1000)["u"].shape  # (1000, 3)
        post.quantiles([0.05, 0.95])["mu"]  # shape (2,)

    :param ModelView view: the model's coordinates.
    :param loc_theta: mean of θ, ``(p,)``.
    :param loc_y: mean of y, ``(N, k)``.
    :param ArrowheadPrecision precision: the precision over ``(θ, y)``.

    :ivar LaplaceGaussian gaussian: the Gaussian over all units.
    """

    def __init__(
        self, view: ModelView, loc_theta: torch.Tensor, loc_y: torch.Tensor, precision: ArrowheadPrecision
    ):
        self.view, self.loc_theta, self.loc_y, self.precision = view, loc_theta, loc_y, precision
        self.gaussian = LaplaceGaussian(loc_theta, loc_y, precision)

    def global_covariance(self) -> torch.Tensor:
        """Covariance of θ, ``S⁻¹`` (``(p, p)``)."""
        return self.precision.global_covariance()

    def marginal_sd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal standard deviations ``(sd_theta (p,), sd_y (N, k))``."""
        var_theta, var_y = self.gaussian.marginal_variances()
        return var_theta.sqrt(), var_y.sqrt()

    def sample(
        self, num_samples: int, *, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Draws of every latent site in constrained space, each with a
        leading dimension ``num_samples``."""
        dtype, device = self.loc_y.dtype, self.loc_y.device
        eps_theta = torch.randn(
            (num_samples, self.precision.global_dim), generator=generator, dtype=dtype
        ).to(device)
        eps_y = torch.randn((num_samples,) + tuple(self.loc_y.shape), generator=generator, dtype=dtype).to(
            device
        )
        return self.view.unpack(*self.gaussian.sample((eps_theta, eps_y)))

    def median(self) -> dict[str, torch.Tensor]:
        """The mean mapped to constrained space, by site."""
        return self.view.unpack(self.loc_theta, self.loc_y)

    def quantiles(self, quantiles: Sequence[float] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Marginal quantiles by site, each with a leading dimension
        ``len(quantiles)``: the unconstrained normal quantiles mapped through
        each site's transform (exact for elementwise monotone transforms)."""
        q = torch.as_tensor(quantiles, dtype=self.loc_y.dtype, device=self.loc_y.device)
        if q.dim() != 1 or not ((q > 0) & (q < 1)).all():
            raise ValueError(f"quantiles must be a list of numbers in (0, 1), got {quantiles!r}")
        z = torch.distributions.Normal(0.0, 1.0).icdf(q)
        sd_theta, sd_y = self.marginal_sd()
        theta = self.loc_theta + z.unsqueeze(-1) * sd_theta
        y = self.loc_y + z.reshape(-1, 1, 1) * sd_y
        return self.view.unpack(theta, y)
