"""The plate-aware Hessian of a model's log density, by compressed products.

Conditional independence across units makes the Hessian of ``log p(θ, y)``
block arrowhead (docs/design.md §2)::

    H = [ A  Bᵀ ]    A: (p, p),  B: (N, k, p),  D: (N, k, k) block diagonal.
        [ B  D  ]

All of it comes from ``p + k`` Hessian-vector products whatever N: one per
global coordinate (giving A and every Bᵢ) and one per local coordinate with
the same direction set in every unit at once (giving every Dᵢ, because D is
block diagonal). Each product is one backward pass through the graph of the
gradient, which is built once.
"""

from __future__ import annotations

import torch

from .arrowhead import ArrowheadPrecision, arrowhead_matvec, arrowhead_to_dense
from .model import ModelView
from .repair import Jitter, SpectralRepair
from .tensor_ops import grad as _grad
from .tensor_ops import symmetrize


class ArrowheadHessian:
    """Blocks of a block-arrowhead Hessian, with the value and gradient at its point.

    ``A`` (p, p), ``B`` (N, k, p) with ``B[i]`` the cross block of unit i
    (rows: its local coordinates), ``D`` (N, k, k); ``log_prob``,
    ``grad_theta`` (p,) and ``grad_y`` (N, k) of the log density at the point.
    The dense ordering is ``(theta, y)`` with y units-major, as in
    :meth:`curvi.ModelView.flatten`.
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        D: torch.Tensor,
        *,
        log_prob: torch.Tensor | None = None,
        grad_theta: torch.Tensor | None = None,
        grad_y: torch.Tensor | None = None,
    ):
        self.A, self.B, self.D = A, B, D
        self.log_prob, self.grad_theta, self.grad_y = log_prob, grad_theta, grad_y

    @property
    def num_units(self) -> int:
        return self.D.shape[0]

    @property
    def global_dim(self) -> int:
        return self.A.shape[0]

    @property
    def local_dim(self) -> int:
        return self.D.shape[-1]

    def to_dense(self) -> torch.Tensor:
        """The dense ``(p + N k)²`` matrix (for tests and small problems)."""
        return arrowhead_to_dense(self.A, self.B, self.D)

    def matvec(self, v: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``H v`` for a pair ``v = (v_theta, v_y)``."""
        return arrowhead_matvec(self.A, self.B, self.D, v)

    def precision(self, *, repair: SpectralRepair | Jitter | str | None = None) -> ArrowheadPrecision:
        """The precision ``P = -H`` as an :class:`ArrowheadPrecision`,
        made positive definite by ``repair`` (see :mod:`curvi.repair`)."""
        return ArrowheadPrecision(-self.A, -self.B, -self.D, repair=repair)


def structured_hessian(
    view: ModelView,
    theta: torch.Tensor,
    y: torch.Tensor,
    *,
    units: torch.Tensor | None = None,
    create_graph: bool = False,
) -> ArrowheadHessian:
    """The block-arrowhead Hessian of ``view.log_joint`` at ``(theta, y)``.

    Costs one gradient evaluation plus ``p + k`` backward passes through it,
    independent of the number of units N.

    The derivatives are *partial* derivatives at the point: if ``theta`` or
    ``y`` carry autograd history (say ``y = ŷ(theta)``), the Hessian still
    treats them as independent arguments. With ``create_graph=True`` the
    returned blocks stay differentiable with respect to that history, so a
    loss built from them backpropagates total derivatives (third derivatives
    of ``log p`` included).

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", len(obs)):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

        view = ModelView(model, torch.tensor([0.0, 3.0, 1.0]), unit_plate="groups")
        H = structured_hessian(view, view.init_theta, view.init_y)
        H.A.shape, H.B.shape, H.D.shape  # (1, 1), (3, 1, 1), (3, 1, 1)
        P = H.precision(repair="softabs")  # an ArrowheadPrecision of -H

    :param ModelView view: the model.
    :param theta: global coordinates, shape ``(p,)``.
    :param y: local coordinates, shape ``(n, k)``.
    :param units: unit indices of the rows of ``y`` (see :meth:`ModelView.log_joint`).
    :param bool create_graph: keep the result differentiable.
    :raises ValueError: when the log density or its gradient is not finite
        (naming the sites responsible).
    """
    p, k = view.global_dim, view.local_dim
    with torch.enable_grad():
        th, yy = _as_inputs(theta, create_graph), _as_inputs(y, create_graph)
        log_prob = view.log_joint(th, yy, units=units)
        g_theta, g_y = _grad(log_prob, (th, yy), create_graph=True)
        _check_finite(view, theta, y, units, log_prob, g_theta, g_y)
        rows = []  # row j of H for global j; D[:, :, l] for local l
        for j in range(p + k):
            out = g_theta[j] if j < p else g_y[:, j - p].sum()
            retain = create_graph or j < p + k - 1
            rows.append(_grad(out, (th, yy), create_graph=create_graph, retain_graph=retain))
    A = torch.stack([r[0] for r in rows[:p]]) if p else theta.new_zeros(0, 0)
    B = torch.stack([r[1] for r in rows[:p]], dim=-1) if p else y.new_zeros(y.shape + (0,))
    D = torch.stack([r[1] for r in rows[p:]], dim=-1) if k else y.new_zeros(y.shape + (0,))
    A, D = symmetrize(A), _unit_curvature_where_flat(g_y, symmetrize(D))
    H = ArrowheadHessian(A, B, D, log_prob=log_prob, grad_theta=g_theta, grad_y=g_y)
    if not create_graph:
        for name in ("A", "B", "D", "log_prob", "grad_theta", "grad_y"):
            setattr(H, name, getattr(H, name).detach())
    return H


def _unit_curvature_where_flat(g_y: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``D`` with ``−1`` on the diagonal of each local coordinate that the log
    density does not depend on here (gradient and curvature row exactly
    zero): the entries of a masked latent, such as the observed entries of
    the ``<name>_unobserved`` site Pyro's ``obs_mask`` creates. Such a
    coordinate has no mode and no curvature; a unit reference curvature
    gives it a fixed N(ŷ, 1) in the guides (whose entropy is a constant of
    the ELBO), no Newton step and no term in the Laplace log-determinant."""
    flat = (g_y.detach() == 0) & (D.detach() == 0).all(-1)
    if not flat.any():
        return D
    return D - torch.diag_embed(flat.to(D.dtype))


def local_hessian(
    view: ModelView,
    theta: torch.Tensor,
    y: torch.Tensor,
    *,
    units: torch.Tensor | None = None,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, gradient in ``y`` and unit blocks ``D`` of ``log p`` at ``(theta, y)``.

    One gradient evaluation plus ``k`` backward passes, whatever N: what a
    Newton step on the units' conditional modes needs. Results are detached
    unless ``create_graph``, which keeps them differentiable with respect to
    the history of ``theta`` and ``y`` (partial derivatives at the point, as
    in :func:`structured_hessian`).

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 3):
                pyro.sample("u", dist.Normal(mu, 1.0))

        view = ModelView(model, unit_plate="groups")
        log_prob, g_y, D = local_hessian(view, view.init_theta, view.init_y)  # D: (3, 1, 1)

    :returns: ``(log_prob, grad_y (n, k), D (n, k, k))``.
    """
    with torch.enable_grad():
        th = theta.view_as(theta) if create_graph and theta.requires_grad else theta.detach()
        yy = _as_inputs(y, create_graph)
        log_prob = view.log_joint(th, yy, units=units)
        if y.numel() == 0:  # no unit latents: no local gradient or blocks
            log_prob = log_prob if create_graph else log_prob.detach()
            return log_prob, y.detach(), y.new_zeros(y.shape + y.shape[-1:])
        (g_y,) = _grad(log_prob, (yy,), create_graph=True)
        k = view.local_dim
        columns = [
            _grad(g_y[:, l].sum(), (yy,), create_graph=create_graph, retain_graph=create_graph or l < k - 1)[
                0
            ]
            for l in range(k)
        ]
    D = _unit_curvature_where_flat(g_y, symmetrize(torch.stack(columns, dim=-1)))
    if create_graph:
        return log_prob, g_y, D
    return log_prob.detach(), g_y.detach(), D.detach()


def gradient(
    view: ModelView,
    theta: torch.Tensor,
    y: torch.Tensor,
    *,
    units: torch.Tensor | None = None,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient ``(∇_θ log p, ∇_y log p)`` of ``view.log_joint`` at ``(theta, y)``.

    Partial derivatives, as in :func:`structured_hessian`.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 3):
                pyro.sample("u", dist.Normal(mu, 1.0))

        view = ModelView(model, unit_plate="groups")
        g_theta, g_y = gradient(view, view.init_theta, view.init_y)  # (1,), (3, 1)
    """
    with torch.enable_grad():
        th, yy = _as_inputs(theta, create_graph), _as_inputs(y, create_graph)
        log_prob = view.log_joint(th, yy, units=units)
        g_theta, g_y = _grad(log_prob, (th, yy), create_graph=create_graph)
        _check_finite(view, theta, y, units, log_prob, g_theta, g_y)
    if not create_graph:
        return g_theta.detach(), g_y.detach()
    return g_theta, g_y


def dense_hessian(
    view: ModelView, theta: torch.Tensor, y: torch.Tensor, *, units: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: ``torch.func.hessian`` of the flattened log joint.

    Materialises the ``(p + N k)²`` matrix in the ordering of
    :meth:`ArrowheadHessian.to_dense`; for tests and small problems only.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 3):
                pyro.sample("u", dist.Normal(mu, 1.0))

        view = ModelView(model, unit_plate="groups")
        H = dense_hessian(view, view.init_theta, view.init_y)  # (4, 4)
    """
    n = y.shape[0]

    def flat_log_joint(x):
        th, yy = x[: view.global_dim], x[view.global_dim :].reshape(n, view.local_dim)
        return view.log_joint(th, yy, units=units)

    x = view.flatten(theta.detach(), y.detach())
    return torch.func.hessian(flat_log_joint)(x)


def _as_inputs(x, create_graph):
    """A fresh autograd node for ``x``: partial derivatives at ``x`` while
    (with ``create_graph``) keeping ``x``'s own history attached."""
    if create_graph and x.requires_grad:
        return x.view_as(x)
    return x.detach().requires_grad_(True)


def _check_finite(view, theta, y, units, log_prob, g_theta, g_y):
    if torch.isfinite(log_prob) and torch.isfinite(g_theta).all() and torch.isfinite(g_y).all():
        return
    view.check_finite(theta.detach(), y.detach(), units=units)
    raise ValueError(
        "the log density is finite but its gradient is not at the requested point "
        f"(non-finite entries: {int((~torch.isfinite(g_theta)).sum())} global, "
        f"{int((~torch.isfinite(g_y)).sum())} local)"
    )
