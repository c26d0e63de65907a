"""A Gaussian posterior over a model's flat coordinates, read out by site.

:class:`LaplacePosterior` is what the Laplace guides' ``get_posterior``
returns: the mean ``(θ̂, ŷ)`` in unconstrained space, an
:class:`~curvi.arrowhead.ArrowheadPrecision` over all units, and the
:class:`~curvi.model.ModelView` that maps coordinates to sites. Marginal
standard deviations come blockwise from the arrowhead (never a dense
covariance): ``Cov θ = S⁻¹`` and ``Cov yᵢ = Dᵢ⁻¹ + Mᵢ S⁻¹ Mᵢᵀ`` with
``Mᵢ = Dᵢ⁻¹ Bᵢ``.
"""

from __future__ import annotations

import torch


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
    """

    def __init__(self, view, loc_theta, loc_y, precision):
        if precision.num_units != loc_y.shape[0] or precision.global_dim != loc_theta.shape[-1]:
            raise ValueError(
                f"precision is over {precision.global_dim} globals and {precision.num_units} "
                f"units but the mean has {loc_theta.shape[-1]} and {loc_y.shape[0]}"
            )
        self.view, self.loc_theta, self.loc_y, self.precision = view, loc_theta, loc_y, precision

    def global_covariance(self) -> torch.Tensor:
        """Covariance of θ, ``S⁻¹`` (``(p, p)``)."""
        return torch.cholesky_inverse(self.precision.cholesky.L_S)

    def marginal_sd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal standard deviations ``(sd_theta (p,), sd_y (N, k))``."""
        cov_theta = self.global_covariance()
        L_D, W, _ = self.precision.cholesky
        M = torch.cholesky_solve(self.precision.B, L_D)  # Dᵢ⁻¹Bᵢ
        var_y = torch.cholesky_inverse(L_D).diagonal(dim1=-2, dim2=-1) + torch.einsum(
            "nkp,pq,nkq->nk", M, cov_theta, M
        )
        return cov_theta.diagonal().sqrt(), var_y.sqrt()

    def sample(self, num_samples: int, *, generator=None) -> dict:
        """Draws of every latent site in constrained space, each with a
        leading dimension ``num_samples``."""
        eps_theta = torch.randn(
            (num_samples, self.precision.global_dim), generator=generator,
            dtype=self.loc_y.dtype,
        ).to(self.loc_y.device)
        eps_y = torch.randn(
            (num_samples,) + tuple(self.loc_y.shape), generator=generator, dtype=self.loc_y.dtype
        ).to(self.loc_y.device)
        delta_theta, delta_y = self.precision.sample((eps_theta, eps_y))
        return self.view.unpack(self.loc_theta + delta_theta, self.loc_y + delta_y)

    def median(self) -> dict:
        """The mean mapped to constrained space, by site."""
        return self.view.unpack(self.loc_theta, self.loc_y)

    def quantiles(self, quantiles) -> dict:
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
