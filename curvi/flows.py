"""Exact Hessians of normalising-flow log densities, layer by layer.

A flow pushes a base point ω through bijections, z = f_L ∘ … ∘ f_1(ω), and
(docs/design.md §9)::

    log q(z) = log q₀(ω) + Σ_l log|det J_{h_l}(x_l)|,    x_0 = z, x_{l+1} = h_l(x_l),

with h_l = f_{L-l}⁻¹ the layers' inverses. Autodiff of ``log_prob`` repeats,
for each of the d directions of the Hessian, the whole flow. Here the
Hessian is pulled back one layer at a time instead. If ``F(y)`` is the part of
the log density downstream of a layer h, with gradient g and Hessian ``H``
at y = h(x), then::

    ∇_x  = Jᵀ g + ∇ log|det J|
    ∇²_x = Jᵀ H J + ∇²_x [gᵀ h(x) + log|det J(x)|]        (g held fixed)

and each layer only needs its own Jacobian J and the Hessian of one scalar.
Those are structured for the layers flows are made of:

* ``Permute``: J a permutation, no second-order term: an index, never the
  lazily cached ``inv_permutation`` (whose caching under ``torch.func``
  breaks later calls; this module never uses ``torch.func``).
* element-wise transforms (event dim 0: Pyro's ``Spline``, ``ExpTransform``,
  ``AffineTransform``, …): J and the second-order term diagonal, from three
  backward passes through the layer.
* ``AffineCoupling`` with a ``DenseNN`` hypernet: closed form. With
  x = (x₁, x₂), the inverse is x₂' = (x₂ − m(x₁)) e^{−s(x₁)}, so
  J = [[I, 0], [C, diag e^{−s}]] with C built from the hypernet's Jacobian,
  and the second-order term needs the hypernet's Hessian contracted with one
  vector per point, Σ_l A_lᵀ diag(δ_l σ''(a_l)) A_l over its hidden layers.
  Both come from a forward pass through the hypernet carrying its Jacobian:
  matrix products, no autodiff.
* other coupling layers (``SplineCoupling``, affine coupling with any
  hypernet): by reverse-over-reverse autodiff of ``gᵀh + log|det J| + ½ δᵀHδ``
  (δ = h(x) − h(x̄), whose Hessian at x̄ is Jᵀ H J): one forward, one
  backward and one double backward batched over d₁ + 1 directions (the rows
  of x₁, and one for the diagonal x₂ block) instead of d.
* any other transform with an inverse: the same with all d directions.
* transforms without an inverse. ``Planar``: the inverse is a scalar
  monotone equation in wᵀy, solved by safeguarded Newton; ``Radial``: a
  quadratic in the radius, solved in closed form; both then pull back in
  O(d²) per point (Jacobian: identity plus rank one). Others (``Sylvester``,
  …): y = f⁻¹(x) by damped Newton in d dimensions. Then implicit
  differentiation: with φ(y) = F(y) − log|det J_f(y)| and λ = J_f⁻ᵀ ∇φ (the
  gradient at x)::

      ∇²_x = J_f⁻ᵀ [∇²φ − ∇²_y(λᵀ f)] J_f⁻¹.

Batched over the leading dimensions of the point. In *base coordinates*
the Hessian of ω ↦ log q(f(ω)) = log q₀(ω) − Σ log|det J_{f_l}| is pulled
back the same way through the forward layers, without any inverse.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pyro.distributions.transforms import AffineCoupling, Permute, SplineCoupling
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.nn import DenseNN
from pyro.nn.dense_nn import ConditionalDenseNN
from torch.distributions import transforms as T

from .tensor_ops import grad as _grad
from .tensor_ops import symmetrize

__all__ = ["FlowHessian", "log_density_hessian"]


class FlowHessian(NamedTuple):
    """The full output of :func:`log_density_hessian`: ``hessian``
    ``(..., d, d)``, ``grad`` ``(..., d)`` and ``log_prob`` ``(...)`` at the
    point, all in the requested coordinates, and the ``base`` point ω
    ``(..., d)``."""

    hessian: torch.Tensor
    grad: torch.Tensor
    log_prob: torch.Tensor
    base: torch.Tensor


def log_density_hessian(
    dist: torch.distributions.Distribution,
    value: torch.Tensor,
    *,
    coordinates: str = "z",
    tol: float | None = None,
    max_iter: int = 50,
    full_output: bool = False,
) -> torch.Tensor | FlowHessian:
    """The exact Hessian of ``dist.log_prob`` at ``value``, batched.

    For a (Pyro or torch) ``TransformedDistribution`` with a vector event the
    Hessian is pulled back layer by layer (see the module docstring): through
    the inverse of each transform where it has one, by Newton's method and
    implicit differentiation where it does not (``Planar``, ``Radial``). Any
    other distribution with a differentiable ``log_prob`` gets the exact
    Hessian by batched reverse-over-reverse autodiff. Never uses
    ``torch.func`` (flows holding Pyro's ``Permute`` are fine).

    Usage::

        import pyro.distributions as dist
        from pyro.distributions.transforms import AffineCoupling, Permute, Radial
        from pyro.nn import DenseNN

        d = 4
        flow = dist.TransformedDistribution(
            dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1),
            [AffineCoupling(2, DenseNN(2, [8], [2, 2])), Permute(torch.tensor([3, 1, 0, 2])),
             Radial(d)])                                  # Radial: no analytic inverse
        z = torch.randn(64, d)
        H = log_density_hessian(flow, z)                  # (64, 4, 4)
        out = log_density_hessian(flow, z, full_output=True)
        out.base.shape, out.log_prob.shape                # (64, 4), (64,): ω and log q(z)
        H_base = log_density_hessian(flow, out.base, coordinates="base")  # ∇²_ω log q(f(ω))

    :param dist: a distribution with a differentiable ``log_prob``.
    :param torch.Tensor value: the point(s), shape ``batch + event_shape``
        (in base coordinates ω when ``coordinates="base"``).
    :param str coordinates: ``"z"`` (default): the Hessian of ``log q(z)`` in
        the distribution's own coordinates. ``"base"``: the Hessian of
        ``ω ↦ log q(f(ω))`` in the base distribution's coordinates, for a
        ``TransformedDistribution``; needs no inverse.
    :param float tol: Newton tolerance for layers without an inverse:
        ``max|f(y) − x| ≤ tol·(1 + max|x|)`` per point; default ``1e-10``
        in float64, ``1e-4`` in lower precision.
    :param int max_iter: Newton iterations allowed per layer.
    :param bool full_output: return a :class:`FlowHessian` with the gradient,
        the log density and the base point as well.
    :returns: the Hessian, ``batch + (d, d)`` with ``d`` the event size
        (row-major over the event), detached; or a :class:`FlowHessian`.
    :raises TypeError: for a ``dist`` without ``log_prob`` or a ``value``
        that is not a floating-point tensor.
    :raises ValueError: for a ``value`` whose trailing shape is not the event
        shape, a ``coordinates`` other than ``"z"`` / ``"base"``, a Newton
        solve that does not converge, or a log density that is not finite.
    """
    if not callable(getattr(dist, "log_prob", None)):
        raise TypeError(f"dist must be a distribution with a log_prob method, got {type(dist).__name__}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    if coordinates not in ("z", "base"):
        raise ValueError(f"coordinates must be 'z' or 'base', got {coordinates!r}")
    event_shape = tuple(dist.event_shape)
    n_event = len(event_shape)
    if value.dim() < n_event or tuple(value.shape[value.dim() - n_event :]) != event_shape:
        raise ValueError(
            f"value has shape {tuple(value.shape)}, which does not end in the event shape "
            f"{event_shape} of {type(dist).__name__}"
        )
    if tol is None:
        tol = 1e-10 if value.dtype == torch.float64 else 1e-4
    batch = torch.broadcast_shapes(value.shape[: value.dim() - n_event], tuple(dist.batch_shape))
    value = value.detach().expand(batch + event_shape)
    if getattr(dist, "_validate_args", False):
        dist._validate_sample(value)  # the ValueError log_prob would raise

    flow = _as_flow(dist)
    if coordinates == "base":
        if flow is None:
            raise ValueError("coordinates='base' needs a TransformedDistribution, got " + type(dist).__name__)
        base_dist, layers = flow
        if tuple(base_dist.event_shape) != tuple(value.shape[-1:]) or not _layered(flow):
            raise ValueError(
                "coordinates='base' supports flows with a vector event whose transforms keep the event shape"
            )
        out = _flow_hessian(base_dist, layers, value, to_base=False, tol=tol, max_iter=max_iter)
    elif flow is not None and n_event == 1 and _layered(flow):
        out = _flow_hessian(*flow, value, to_base=True, tol=tol, max_iter=max_iter)
    else:
        lp, g, H = _autograd_hessian(dist.log_prob, value, event_shape)
        out = FlowHessian(H, g, lp, value if flow is None else _inverse_point(flow, value))
    _check_finite(out.log_prob)
    out = FlowHessian(symmetrize(out.hessian), *out[1:])
    return out if full_output else out.hessian


# ----------------------------------------------------------------- structure
def _as_flow(dist):
    """``(base_dist, [(transform, inverted)])`` for a TransformedDistribution
    (nested ones and ``ComposeTransform`` flattened; ``inverted`` marks a
    transform that appears as ``t.inv``), else None."""
    if not isinstance(dist, torch.distributions.TransformedDistribution):
        return None
    layers = []
    while isinstance(dist, torch.distributions.TransformedDistribution):
        layers = [p for t in dist.transforms for p in _parts(t, False)] + layers
        dist = dist.base_dist
    return dist, layers


def _parts(t, inverted):
    if isinstance(t, T._InverseTransform):
        return _parts(t._inv, not inverted)
    if isinstance(t, T.ComposeTransform):
        parts = [p for s in t.parts for p in _parts(s, inverted)]
        return parts[::-1] if inverted else parts
    return [(t, inverted)]


def _layered(flow):
    """Whether every transform maps vectors to vectors of the same size (or
    acts element-wise): what the layer-by-layer pullback handles."""
    base_dist, layers = flow
    if len(base_dist.event_shape) != 1:
        return False
    return all(
        t.domain.event_dim <= 1 and t.codomain.event_dim <= 1 and not _changes_shape(t) for t, _ in layers
    )


def _changes_shape(t):
    shape = (1, 7)
    try:
        return tuple(t.forward_shape(shape)) != shape
    except Exception:  # noqa: BLE001 - a transform that cannot say: let the pullback try
        return False


def _map(t, inverted, forward):
    """The transform applied in the flow's direction (``forward``) or against it."""
    return t if forward != inverted else t.inv


# ---------------------------------------------------------------- the sweep
@torch.no_grad()
def _flow_hessian(base_dist, layers, point, *, to_base, tol, max_iter):
    """Run the layers from ``point`` (through the inverses from z to ω when
    ``to_base``, forward from ω otherwise), then pull gradient and Hessian back
    through them in the opposite order."""
    seq = list(enumerate(layers))
    if to_base:
        seq.reverse()
    forward, nu = not to_base, (1.0 if to_base else -1.0)
    points, states = [point], []
    for i, (t, inverted) in seq:
        y, state = _apply(t, inverted, forward, points[-1], tol=tol, max_iter=max_iter, index=i)
        points.append(y)
        states.append(state)
    if to_base:
        omega = points[-1]
        lp, g, H = _base_terms(base_dist, omega)
    else:
        omega, d = point, point.shape[-1]
        lp, g, H = (
            point.new_zeros(point.shape[:-1]),
            torch.zeros_like(point),
            point.new_zeros(point.shape + (d,)),
        )
    for j in reversed(range(len(seq))):
        t, inverted = seq[j][1]
        x, y = points[j], points[j + 1]
        if states[j] == "newton":
            g, H, ldj = _implicit_pullback(_map(t, inverted, not forward), y, g, H, nu)
        elif states[j] in ("planar", "radial"):
            g, H, ldj = _rank_one_pullback(t, True, y, g, H, nu)
        else:
            g, H, ldj = _pullback(t, inverted, forward, x, g, H, nu, states[j])
        lp = lp + ldj
    if not to_base:
        lp0, g0, H0 = _base_terms(base_dist, omega)
        lp, g, H = lp + lp0, g + g0, H + H0
    return FlowHessian(H, g, lp, omega)


def _apply(t, inverted, forward, x, *, tol, max_iter, index):
    """One layer's output and what its pullback can reuse: the hypernet's
    derivatives for an analytic affine coupling; ``"planar"`` / ``"radial"``
    / ``"newton"`` for a layer inverted without an analytic inverse."""
    if _analytic_affine(t):
        net = _DenseNNDerivatives(t.nn, x[..., : t.split_dim])
        return _affine_coupling_apply(t, forward == inverted, x, net), net
    radial = _radial_params(t)
    if radial is not None and forward == inverted:
        return _radial_inverse(*radial, x), "radial"
    planar = _planar_params(t)
    if planar is not None and forward == inverted:
        name = f"layer {index} ({type(t).__name__})"
        return _planar_inverse(*planar, x, tol=tol, max_iter=max_iter, name=name), "planar"
    try:
        return _map(t, inverted, forward)(x.clone()), None
    except (KeyError, NotImplementedError):  # no analytic inverse (Sylvester, ...)
        f = _map(t, inverted, not forward)
        name = f"layer {index} ({type(t).__name__})"
        return _newton_inverse(f, x, tol=tol, max_iter=max_iter, name=name), "newton"


def _inverse_point(flow, z):
    base_dist, layers = flow
    with torch.no_grad():
        for t, inverted in reversed(layers):
            z = _map(t, inverted, False)(z.clone())
    return z


# ------------------------------------------------------------------ pullbacks
def _pullback(t, inverted, forward, x, g, H, nu, state=None):  # noqa: C901
    """Gradient, Hessian at x of ``F(m(x)) + nu·log|det J_m(x)|`` given those of F
    at ``m(x)``, with ``m`` the transform applied forward or inverted; also
    returns ``nu·log|det J_m(x)|`` per point."""
    m = _map(t, inverted, forward)
    if type(t) is Permute and t.dim == -1:
        return _permute_pullback(t.permutation, inverted != forward, g, H)
    if _elementwise(t):
        return _elementwise_pullback(m, x, g, H, nu)
    if _analytic_affine(t):
        return _affine_coupling_pullback(t, forward == inverted, x, g, H, nu, state)
    if forward != inverted and (_planar_params(t) is not None or _radial_params(t) is not None):
        return _rank_one_pullback(t, False, x, g, H, nu)
    if (type(t) is AffineCoupling and t.dim == -1) or type(t) is SplineCoupling:
        return _coupling_pullback(m, t.split_dim, x, g, H, nu)
    return _generic_pullback(m, x, g, H, nu)


def _analytic_affine(t):
    return (
        type(t) is AffineCoupling
        and t.dim == -1
        and _is_dense_nn(t.nn)
        and _activation_ok(t.nn.f)
        and len(t.nn.param_dims) == 2
        and t.nn.param_dims[0] == t.nn.param_dims[1]
    )


def _permute_pullback(perm, forward, g, H):
    """m(x) = x[perm] (forward) or x[perm⁻¹]: Jᵀ g and Jᵀ H J are re-indexings."""
    idx = torch.argsort(perm) if forward else perm
    idx = idx.to(g.device)
    return g[..., idx], H.index_select(-2, idx).index_select(-1, idx), g.new_zeros(g.shape[:-1])


def _elementwise(t):
    return (t.domain.event_dim == 0 and t.codomain.event_dim == 0) or type(t) is T.AffineTransform


def _elementwise_pullback(m, x, g, H, nu):
    """J = diag(m'), second-order term diag(g m'' + nu·(log|m'|)'')."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_()
        y = m(xx)
        ldj = _per_point(m.log_abs_det_jacobian(xx, y), xx.dim() - 1, xx.shape[:-1])
        (S,) = _grad(y.sum(), xx, retain_graph=True)
        (gn,) = _grad((g * y).sum() + nu * ldj.sum(), xx, create_graph=True)
        (M,) = _grad(gn.sum(), xx) if gn.requires_grad else (torch.zeros_like(xx),)
    H = S.unsqueeze(-1) * H * S.unsqueeze(-2) + torch.diag_embed(M)
    return gn.detach(), H, nu * ldj.detach()


def _generic_pullback(m, x, g, H, nu):
    """All d rows of ∇²_x[gᵀm + nu·ldj + ½ δᵀHδ], δ = m(x) − m(x̄) (which
    equals Jᵀ H J + the second-order term at x = x̄), by one forward, one
    backward and one batched double backward."""
    d = x.shape[-1]
    gq, rows, ldj, _ = _hessian_rows(_pullback_objective(m, g, H, nu), x, _directions(x, d))
    _clear_cache(m)
    return gq, rows.movedim(0, -2), nu * ldj


def _coupling_pullback(m, d1, x, g, H, nu):
    """A coupling layer: m(x) = (a(x₁), b(x₂; x₁)) with a, b element-wise in
    their first argument. Its Hessian is dense only in the rows of x₁; the
    x₂ block is ``S H₂₂ S + diag(M₂₂)`` with S = ∂b/∂x₂ (diagonal). Directions:
    d₁ for the rows of x₁, and Σ_{k∈x₂} e_k, whose row is on x₂
    ``S (H₂₂ S) + diag(M₂₂)``."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    R = x.new_zeros((d1 + 1,) + (1,) * len(lead) + (d,))
    R[:d1, ..., :d1] = torch.eye(d1, dtype=x.dtype, device=x.device).reshape((d1,) + R.shape[1:-1] + (d1,))
    R[d1, ..., d1:] = 1
    gq, rows, ldj, S = _hessian_rows(
        _pullback_objective(m, g, H, nu), x, R.expand((d1 + 1,) + x.shape), diag_from=d1
    )
    _clear_cache(m)
    H22 = H[..., d1:, d1:]
    top = rows[:d1].movedim(0, -2)  # (..., d1, d)
    M22 = rows[d1, ..., d1:] - S * (H22 @ S.unsqueeze(-1)).squeeze(-1)
    Hn = torch.empty_like(H)
    Hn[..., :d1, :] = top
    Hn[..., d1:, :d1] = top[..., d1:].transpose(-1, -2)
    Hn[..., d1:, d1:] = S.unsqueeze(-1) * H22 * S.unsqueeze(-2) + torch.diag_embed(M22)
    return gq, Hn, nu * ldj


def _pullback_objective(m, g, H, nu):
    """x ↦ (Σ [gᵀ m(x) + nu·ldj(x) + ½ δᵀ H δ], ldj, m(x)), δ = m(x) − m(x̄):
    its gradient at x̄ is Jᵀ g + nu ∇ldj, its Hessian Jᵀ H J + ∇²(gᵀm + nu·ldj)."""

    def objective(x):
        y = m(x)
        ldj = _per_point(m.log_abs_det_jacobian(x, y), x.dim() - 1, x.shape[:-1])
        delta = y - y.detach()
        quad = (delta * (H @ delta.unsqueeze(-1)).squeeze(-1)).sum()
        return (g * y).sum() + nu * ldj.sum() + 0.5 * quad, ldj, y

    return objective


_BATCHED_ROWS = True  # False: always stack the rows (the fallback path)


def _hessian_rows(objective, x, R, diag_from=None):
    """Gradient and the rows ``R[i]ᵀ ∇²Q`` of the Hessian of a sum over points
    ``Q = objective(x)[0]`` (and, with ``diag_from=k``, ``∂Σ_{i≥k} y_i/∂x_i``
    for the output y, the diagonal of an element-wise block).

    One forward, one backward and one double backward batched over the rows
    with ``is_grads_batched``; if an operation cannot be batched that way,
    the rows are stacked along a new leading dimension instead (the forward
    then runs once per row)."""
    try:
        if not _BATCHED_ROWS:
            raise RuntimeError("stacked rows requested")
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            Q, ldj, y = objective(xx)
            S = None
            if diag_from is not None:
                (S,) = _grad(y[..., diag_from:].sum(), xx, retain_graph=True)
                S = S[..., diag_from:]
            (gq,) = _grad(Q, xx, create_graph=True)
            if gq.requires_grad:
                (rows,) = _grad(gq, xx, R, is_grads_batched=True)
            else:
                rows = torch.zeros_like(R)
        return gq.detach(), rows, ldj.detach(), S
    except RuntimeError as error:  # no batching rule for an op: the stacked path below
        if isinstance(error, torch.OutOfMemoryError):
            raise
    n = R.shape[0]
    with torch.enable_grad():
        xe = _stacked_leaf(x, n)
        Q, ldj, y = objective(xe)
        S = None
        if diag_from is not None:
            (S,) = _grad(y[..., diag_from:].sum(), xe, retain_graph=True)
            S = S[0, ..., diag_from:]
        (gq,) = _grad(Q, xe, create_graph=True)
        (rows,) = _grad(gq, xe, R) if gq.requires_grad else (torch.zeros_like(xe),)
    return gq[0].detach(), rows, ldj[0].detach(), S


def _affine_coupling_apply(t, inverse, x, net):
    d1 = t.split_dim
    x2 = x[..., d1:]
    d2 = x2.shape[-1]
    mean, s = net.out[..., :d2], net.out[..., d2:].clamp(t.log_scale_min_clip, t.log_scale_max_clip)
    y2 = (x2 - mean) * torch.exp(-s) if inverse else x2 * torch.exp(s) + mean
    return torch.cat([x[..., :d1], y2], dim=-1)


def _affine_coupling_pullback(t, inverse, x, g, H, nu, net=None):
    """Pyro's ``AffineCoupling`` (``DenseNN`` hypernet) in closed form.

    Forward: y₂ = x₂ e^{s} + m; inverse: y₂ = (x₂ − m) e^{−s}; log|det J| =
    ±Σ s; (m, s) = net(x₁), s clamped with gradients preserved as in Pyro.
    Writing ``a(m, s) = g₂ᵀ y₂ + nu·log|det J|``: J = [[I, 0], [C, diag S]]
    with C = diag(p_m) J_m + diag(p_s) J_s, the second-order term has
    M₂₁ = diag(q) J_s, M₂₂ = 0 and M₁₁ = [J_m; J_s]ᵀ ∇²a [J_m; J_s] +
    Σ_i (∂a/∂out_i) ∇² out_i. Jacobians are kept transposed, ``(..., d₁, ·)``,
    so that products with the hypernet's weights are single matrix products."""
    d1 = t.split_dim
    x1, x2 = x[..., :d1], x[..., d1:]
    g1, g2 = g[..., :d1], g[..., d1:]
    d2 = x2.shape[-1]
    net = _DenseNNDerivatives(t.nn, x1) if net is None else net
    mean, s_raw = net.out[..., :d2], net.out[..., d2:]
    Jmt, Jst = net.jac_t[..., :d2], net.jac_t[..., d2:]  # (..., d1, d2)
    s = s_raw.clamp(t.log_scale_min_clip, t.log_scale_max_clip)
    if inverse:
        S = torch.exp(-s)
        y2 = (x2 - mean) * S
        q = -g2 * S
        Ct = Jmt * (-S).unsqueeze(-2) - Jst * y2.unsqueeze(-2)
        U = Jmt * (g2 * S).unsqueeze(-2) + Jst * (0.5 * g2 * y2).unsqueeze(-2)
        c_m, c_s = -g2 * S, -g2 * y2 - nu
        ldj = -s.sum(-1)
    else:
        S = torch.exp(s)
        y2 = x2 * S + mean
        q = g2 * S
        Ct = Jmt + Jst * (x2 * S).unsqueeze(-2)
        U = Jst * (0.5 * g2 * x2 * S).unsqueeze(-2)
        c_m, c_s = g2, g2 * x2 * S + nu
        ldj = s.sum(-1)
    c = torch.cat([c_m, c_s], dim=-1)
    X = U @ Jst.transpose(-1, -2)
    M11 = X + X.transpose(-1, -2)
    M11 = M11 + net.contracted_hessian(c) if net.curved else M11
    g_new = torch.cat([g1 + (net.jac_t @ c.unsqueeze(-1)).squeeze(-1), g2 * S], dim=-1)
    # Jᵀ H J for J = [[I, 0], [C, diag S]]: HJ₁ = H[:, x₁] + H[:, x₂] C
    HJ1 = torch.matmul(H[..., :, d1:], Ct.transpose(-1, -2)) + H[..., :, :d1]
    Hn = torch.empty_like(H)
    Hn[..., :d1, :d1] = torch.matmul(Ct, HJ1[..., d1:, :]) + HJ1[..., :d1, :] + M11
    low = S.unsqueeze(-1) * HJ1[..., d1:, :] + (Jst * q.unsqueeze(-2)).transpose(-1, -2)
    Hn[..., d1:, :d1] = low
    Hn[..., :d1, d1:] = low.transpose(-1, -2)
    Hn[..., d1:, d1:] = S.unsqueeze(-1) * H[..., d1:, d1:] * S.unsqueeze(-2)
    return g_new, Hn, nu * ldj


def _implicit_pullback(f, y, g, H, nu):
    """Pullback through m = f⁻¹ without evaluating m (y = m(x) given):
    F(x) = φ(y(x)) with φ = F_next − nu·log|det J_f|; with λ = J_f⁻ᵀ ∇φ,
    ∇²_x = J_f⁻ᵀ [∇²F_next − ∇²_y(λᵀ f + nu·log|det J_f|)] J_f⁻¹."""
    d = y.shape[-1]
    with torch.enable_grad():
        ye = _stacked_leaf(y, d)
        x = f(ye)
        ldj = _per_point(f.log_abs_det_jacobian(ye, x), ye.dim() - 1, ye.shape[:-1])
        rows = _directions(y, d)
        (J,) = _grad(x, ye, rows, retain_graph=True)  # J[i] = row i of J_f
        J = J.movedim(0, -2).detach()
        (g_ldj,) = _grad(nu * ldj.sum(), ye, create_graph=True)
        lam = torch.linalg.solve(J.transpose(-1, -2), g - g_ldj[0].detach())
        (gq,) = _grad((lam * x).sum(), ye, create_graph=True)
        gq = gq + g_ldj
        (N,) = _grad(gq, ye, rows) if gq.requires_grad else (torch.zeros_like(ye),)
    _clear_cache(f)
    K = torch.linalg.inv(J)
    H = K.transpose(-1, -2) @ (H - N.movedim(0, -2)) @ K
    return lam, H, -nu * ldj[0].detach()


# --------------------------------------------------------- planar and radial
def _planar_params(t):
    """(bias, û, w) of a Pyro (Conditioned)Planar, else None."""
    if not isinstance(t, ConditionedPlanar) or type(t)._call is not ConditionedPlanar._call:
        return None
    bias, u, w = t._params() if callable(t._params) else t._params
    return bias, t.u_hat(u, w), w


def _radial_params(t):
    """(x₀, α, β) of a Pyro (Conditioned)Radial, else None."""
    if not isinstance(t, ConditionedRadial) or type(t)._call is not ConditionedRadial._call:
        return None
    x0, alpha_prime, beta_prime = t._params() if callable(t._params) else t._params
    alpha = F.softplus(alpha_prime)
    return x0, alpha, -alpha + F.softplus(beta_prime)


def _planar_inverse(bias, uhat, w, x, *, tol, max_iter, name):
    """y with y + û tanh(wᵀy + b) = x. With α = wᵀy this is the scalar,
    increasing equation α + c tanh(α + b) = wᵀx (c = wᵀû > −1), whose root
    lies within |c| of wᵀx: safeguarded Newton on α, then y = x − û tanh(α + b)."""
    c = (w * uhat).sum(-1)
    target = (w * x).sum(-1)
    lo, hi = target - c.abs(), target + c.abs()
    alpha = target.clone()
    b = bias.squeeze(-1)
    eps = torch.finfo(x.dtype).eps
    for _ in range(max_iter + 1):
        th = torch.tanh(alpha + b)
        r = alpha + c * th - target
        done = r.abs() <= 8 * eps * (1 + target.abs() + c.abs())
        if bool(done.all()):
            break
        lo, hi = torch.where(r < 0, alpha, lo), torch.where(r > 0, alpha, hi)
        step = alpha - r / (1 + c * (1 - th * th))
        inside = (step > lo) & (step < hi)
        alpha = torch.where(done, alpha, torch.where(inside, step, 0.5 * (lo + hi)))
    y = x - uhat * torch.tanh(alpha + b).unsqueeze(-1)
    res = (y + uhat * torch.tanh((w * y).sum(-1, keepdim=True) + bias) - x).abs().amax(-1)
    bad = ~(res <= tol * (1 + x.abs().amax(-1)))
    if bad.any():
        raise ValueError(
            f"Newton's method did not invert {name} at {int(bad.sum())} of {bad.numel()} points "
            f"within max_iter={max_iter} iterations (largest residual {float(res[bad].max()):.3g}, "
            f"tol={tol:g}); the transform may not be invertible there"
        )
    return y


def _radial_inverse(x0, alpha, beta, x):
    """y with y + β/(α + r) (y − x₀) = x, r = |y − x₀|: |x − x₀| = ρ gives
    r² + (α + β − ρ) r − ρα = 0, solved in closed form."""
    v = x - x0
    rho = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    B = alpha + beta - rho
    disc = torch.sqrt(B * B + 4 * rho * alpha)
    r = torch.where(B > 0, 2 * rho * alpha / (B + disc), 0.5 * (disc - B))
    return x0 + v / (1 + beta / (alpha + r))


def _rank_one_pullback(t, inverse, y, g, H, nu):
    """Planar or radial layer f, whose Jacobian is ``s I + a bᵀ`` and whose
    second-order terms are of rank ≤ 2 at y (the base side of f): the
    pullback through f (``inverse=False``) or, implicitly, through f⁻¹
    (``inverse=True``, see :func:`_implicit_pullback`) in O(d²) per point.
    Returns gradient, Hessian and ``nu·log|det J|`` of the map pulled back through."""
    planar = _planar_params(t)
    if planar is not None:
        bias, uhat, w = planar
        c = (w * uhat).sum(-1, keepdim=True)
        th = torch.tanh((w * y).sum(-1, keepdim=True) + bias)
        t1 = 1 - th * th
        t2 = -2 * th * t1
        t3 = -2 * t1 * t1 + 4 * th * th * t1
        det = 1 + c * t1
        ldj = torch.log(det.abs()).squeeze(-1)
        grad_ldj = (c * t2 / det) * w
        # N(λ) = ∇²(λᵀf + nu·ldj) = κ(λ) w wᵀ
        curv = c * t3 / det - (c * t2 / det) ** 2
        kappa = lambda lam: (lam * uhat).sum(-1, keepdim=True) * t2 + nu * curv  # noqa: E731
        N = lambda lam: _outer(kappa(lam) * w, w)  # noqa: E731
        s, a, b = torch.ones_like(c), t1 * uhat, w.expand_as(y)  # J_f = s I + a bᵀ
    else:
        x0, alpha, beta = _radial_params(t)
        v = y - x0
        r = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        e = v / r
        d = y.shape[-1]
        h = 1 / (alpha + r)
        p0, p1, p2, p3 = beta * h, -beta * h**2, 2 * beta * h**3, -6 * beta * h**4  # φ = β h and derivatives
        A, A1, A2 = 1 + p0, p1, p2
        Bf, Bf1, Bf2 = 1 + p0 + p1 * r, 2 * p1 + p2 * r, 3 * p2 + p3 * r
        ldj = ((d - 1) * torch.log1p(p0) + torch.log1p(p0 + p1 * r)).squeeze(-1)
        l1 = (d - 1) * A1 / A + Bf1 / Bf
        l2 = (d - 1) * (A2 / A - (A1 / A) ** 2) + Bf2 / Bf - (Bf1 / Bf) ** 2
        grad_ldj = l1 * e

        def N(lam):  # ∇²(λᵀ f + nu·ldj), f = y + φ(r) v
            lv = (lam * v).sum(-1, keepdim=True)
            c_iso = p1 * lv / r + nu * l1 / r
            c_ee = p2 * lv - p1 * lv / r + nu * (l2 - l1 / r)
            eye = torch.eye(d, dtype=y.dtype, device=y.device)
            return (
                c_iso.unsqueeze(-1) * eye
                + _outer(c_ee * e, e)
                + p1.unsqueeze(-1) * (_outer(e, lam) + _outer(lam, e))
            )

        s, a, b = A, p1 * r * e, e  # J_f = (1 + φ) I + φ' r e eᵀ
    if inverse:
        # K = J_f⁻¹ = (I − γ a bᵀ) / s, γ = 1 / (s + bᵀa)
        gamma = 1 / (s + (a * b).sum(-1, keepdim=True))
        phi = g - nu * grad_ldj
        lam = (phi - gamma * b * (a * phi).sum(-1, keepdim=True)) / s  # Kᵀ ∇φ
        M = H - N(lam)
        MK = (M - gamma.unsqueeze(-1) * _outer(M @ a.unsqueeze(-1), b.unsqueeze(-1))) / s.unsqueeze(-1)
        aMK = a.unsqueeze(-2) @ MK  # (..., 1, d)
        Hn = (MK - gamma.unsqueeze(-1) * b.unsqueeze(-1) * aMK) / s.unsqueeze(-1)
        return lam, Hn, -nu * ldj
    # J_fᵀ H J_f + N(g), J_f = s I + a bᵀ
    Ha = H @ a.unsqueeze(-1)  # (..., d, 1)
    sm = s.unsqueeze(-1)
    cross = sm * _outer(Ha, b.unsqueeze(-1))
    Hn = sm * sm * H + cross + cross.transpose(-1, -2) + (a.unsqueeze(-2) @ Ha) * _outer(b, b) + N(g)
    g_new = s * g + b * (a * g).sum(-1, keepdim=True) + nu * grad_ldj
    return g_new, Hn, nu * ldj


def _outer(p, q):
    """p qᵀ for (..., d) vectors, or for (..., d, 1) columns."""
    if p.dim() >= 2 and p.shape[-1] == 1 and q.shape[-1] == 1:
        return p @ q.transpose(-1, -2)
    return p.unsqueeze(-1) * q.unsqueeze(-2)


# ------------------------------------------------------------ Newton inverse
def _newton_inverse(f, x, *, tol, max_iter, name):
    """y with f(y) = x by damped Newton (per point backtracking on max|f(y) − x|)."""
    y = x.clone()
    scale = 1 + x.abs().amax(-1)
    r, J = _value_and_jacobian(f, y)
    r = r - x
    res = r.abs().amax(-1)
    for _ in range(max_iter):
        if bool((res <= tol * scale).all()):
            return _polish(f, x, y, r, J, res)
        if not torch.isfinite(res).all():
            break
        step = torch.linalg.solve(J, r.unsqueeze(-1)).squeeze(-1)
        t = torch.ones_like(res)
        for _ in range(30):
            y_try = y - t.unsqueeze(-1) * step
            with torch.no_grad():
                res_try = (f(y_try) - x).abs().amax(-1)
            ok = (res_try < res) | (res <= tol * scale)
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        y = torch.where((res <= tol * scale).unsqueeze(-1), y, y_try)
        r, J = _value_and_jacobian(f, y)
        r = r - x
        res = r.abs().amax(-1)
    if bool((res <= tol * scale).all()):
        return _polish(f, x, y, r, J, res)
    bad = ~(res <= tol * scale)
    raise ValueError(
        f"Newton's method did not invert {name} at {int(bad.sum())} of {bad.numel()} points "
        f"within max_iter={max_iter} iterations (largest residual {float(res[bad].max()):.3g}, "
        f"tol={tol:g}); the transform may not be invertible there"
    )


def _polish(f, x, y, r, J, res):
    """One more Newton step where it does not increase the residual: the
    converged iterate to working precision."""
    y_new = y - torch.linalg.solve(J, r.unsqueeze(-1)).squeeze(-1)
    res_new = (f(y_new) - x).abs().amax(-1)
    return torch.where((res_new <= res).unsqueeze(-1), y_new, y)


def _value_and_jacobian(f, y):
    d = y.shape[-1]
    with torch.enable_grad():
        ye = _stacked_leaf(y, d)
        out = f(ye)
        (J,) = _grad(out, ye, _directions(y, d))
    _clear_cache(f)
    return out[0].detach(), J.movedim(0, -2)


# --------------------------------------------------------- base distribution
def _base_terms(base, w):
    """``log q₀(ω)`` per point, its gradient and Hessian."""
    inner = base
    if isinstance(inner, torch.distributions.Independent) and inner.reinterpreted_batch_ndims == 1:
        inner = inner.base_dist
        if isinstance(inner, torch.distributions.Normal) and not inner.event_shape:
            loc, scale = inner.loc, inner.scale
            prec = scale.pow(-2).expand(w.shape)
            lp = base.log_prob(w)
            return lp.expand(w.shape[:-1]), -(w - loc) * prec, torch.diag_embed(-prec)
    if isinstance(base, torch.distributions.MultivariateNormal):
        P = base.precision_matrix
        g = -(P @ (w - base.loc).unsqueeze(-1)).squeeze(-1)
        return base.log_prob(w).expand(w.shape[:-1]), g, (-P).expand(w.shape + w.shape[-1:])
    lp, g, H = _autograd_hessian(base.log_prob, w, tuple(w.shape[-1:]))
    return lp, g, H


# -------------------------------------------------------------------- helpers
def _autograd_hessian(log_prob, value, event_shape):
    """Exact Hessian of ``log_prob`` by reverse-over-reverse autodiff: one
    forward, one backward, one double backward batched over the
    ``n = prod(event_shape)`` directions."""
    n = math.prod(event_shape)
    lead = value.shape[: value.dim() - len(event_shape)]
    flat = value.reshape(lead + (n,))

    def objective(x):
        lp = log_prob(x.reshape(x.shape[:-1] + tuple(event_shape))).expand(x.shape[:-1])
        return lp.sum(), lp, x

    g, rows, lp, _ = _hessian_rows(objective, flat, _directions(flat, n))
    return lp, g.reshape(value.shape), rows.movedim(0, -2)


class _DenseNNDerivatives:
    """Output, input Jacobian and contracted Hessian of a Pyro ``DenseNN``
    (Linear layers with an element-wise activation), by a forward pass that
    carries the transposed Jacobian ``A_lᵀ = (∂a_l/∂x)ᵀ`` of each layer's
    pre-activation: ``(..., n_in, h_l)``, updated by one matrix product with
    the layer's weight."""

    def __init__(self, net, x):
        layers = list(net.layers)
        last = layers[-1]
        one_hidden = len(layers) == 2 and _outer_chunk(layers[0].weight.shape, last.weight.shape)
        h, At = x, None
        self.hidden = []  # (A_lᵀ, σ'(a_l), σ''(a_l), W_{l+1}) per hidden layer
        for i, lin in enumerate(layers[:-1]):
            a = F.linear(h, lin.weight, lin.bias)
            Wt = lin.weight.t().contiguous()  # row-major (n_in, h): products stay contiguous
            At = Wt if At is None else At @ Wt
            h, s1, s2 = _activation_derivatives(net.f, a)
            self.hidden.append((At, s1, s2, layers[i + 1].weight))
            if not one_hidden:
                At = At * s1.unsqueeze(-2)
        self.out = F.linear(h, last.weight, last.bias)
        if one_hidden:
            jac_t = _one_hidden_jacobian(layers[0].weight, self.hidden[0][1], last.weight)
        else:
            Wt = last.weight.t().contiguous()
            jac_t = Wt if At is None else At @ Wt
        self.jac_t = jac_t.expand(x.shape[:-1] + jac_t.shape[-2:])  # (..., n_in, n_out)
        self.curved = any(s2 is not None for _, _, s2, _ in self.hidden)

    def contracted_hessian(self, c):
        """``Σ_i c_i ∇² out_i`` = Σ_l A_lᵀ diag(δ_l σ''(a_l)) A_l, δ_l the
        adjoint of layer l's output."""
        total = 0
        delta = c
        for At, s1, s2, W_next in reversed(self.hidden):
            delta = delta @ W_next  # adjoint of this layer's activation output
            if s2 is not None:
                At = At.expand(delta.shape[:-1] + At.shape[-2:])
                total = total + (At * (delta * s2).unsqueeze(-2)) @ At.transpose(-1, -2)
            delta = delta * s1
        return total


_OUTER_BUDGET = 2**20  # elements of W₁ ⊗ W₂ built at once


def _outer_chunk(w1_shape, w2_shape):
    """Rows of W₁ ⊗ W₂ per chunk for :func:`_one_hidden_jacobian`, or 0
    when the chunks would be too thin for an efficient matrix product."""
    (h, n_in), n_out = w1_shape, w2_shape[0]
    chunk = min(h, _OUTER_BUDGET // (n_in * n_out))
    return chunk if chunk >= min(h, 64) else 0


def _one_hidden_jacobian(W1, s1, W2):
    """``W₁ᵀ diag(σ') W₂ᵀ`` for every point as one product ``σ' @ K`` with
    ``K[k] = W₁[k] ⊗ W₂[:, k]``: a single wide matrix product (in chunks of
    hidden units) instead of a batch of small ones."""
    (h, n_in), n_out = W1.shape, W2.shape[0]
    chunk = _outer_chunk(W1.shape, W2.shape)
    out = s1.new_zeros(s1.shape[:-1] + (n_in * n_out,))
    for k in range(0, h, chunk):
        K = W1[k : k + chunk].unsqueeze(-1) * W2[:, k : k + chunk].t().unsqueeze(-2)
        out = out + s1[..., k : k + chunk] @ K.reshape(-1, n_in * n_out)
    return out.reshape(s1.shape[:-1] + (n_in, n_out))


_PIECEWISE_LINEAR = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ReLU6, torch.nn.Hardtanh, torch.nn.Identity)
_SMOOTH = (
    torch.nn.Tanh,
    torch.nn.Sigmoid,
    torch.nn.ELU,
    torch.nn.SELU,
    torch.nn.CELU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Softplus,
    torch.nn.Mish,
    torch.nn.Softsign,
    torch.nn.LogSigmoid,
    torch.nn.Tanhshrink,
)


def _activation_ok(f):
    return type(f) in _PIECEWISE_LINEAR + _SMOOTH


def _activation_derivatives(f, a):
    """σ(a), σ'(a), σ''(a) element-wise (σ'' None when identically zero)."""
    if type(f) is torch.nn.ReLU:
        return torch.relu(a), (a > 0).to(a.dtype), None
    if type(f) is torch.nn.Tanh:
        th = torch.tanh(a)
        s1 = 1 - th * th
        return th, s1, -2 * th * s1
    with torch.enable_grad():
        aa = a.detach().requires_grad_()
        out = f(aa)
        (s1,) = _grad(out.sum(), aa, create_graph=type(f) not in _PIECEWISE_LINEAR)
        if type(f) in _PIECEWISE_LINEAR:
            return out.detach(), s1, None
        (s2,) = _grad(s1.sum(), aa)
    return out.detach(), s1.detach(), s2


def _is_dense_nn(net):
    return (
        isinstance(net, DenseNN)
        and type(net).forward is DenseNN.forward
        and type(net)._forward is ConditionalDenseNN._forward
    )


def _stacked_leaf(x, n):
    """``n`` copies of x stacked in front: a fresh leaf to differentiate."""
    return x.detach().unsqueeze(0).expand((n,) + x.shape).clone().requires_grad_(True)


def _directions(x, n):
    """Unit vectors e_0 … e_{n-1} in front of x's leading shape: grad outputs
    whose backward pass returns one Hessian / Jacobian row per direction."""
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    return eye.reshape((n,) + (1,) * (x.dim() - 1) + (n,)).expand((n,) + x.shape)


def _per_point(ldj, lead_ndim, lead_shape):
    if ldj.dim() > lead_ndim:
        ldj = ldj.sum(dim=tuple(range(lead_ndim, ldj.dim())))
    return ldj.expand(lead_shape)


def _clear_cache(m):
    """Drop the transform's one-element cache (it holds our autograd graph)."""
    t = m._inv if isinstance(m, T._InverseTransform) else m
    if getattr(t, "_cache_size", 0) == 1:
        t._cached_x_y = None, None


def _name(t):
    return type(t).__name__


def _check_finite(log_prob):
    bad = ~torch.isfinite(log_prob)
    if bad.any():
        raise ValueError(
            f"the log density is not finite at {int(bad.sum())} of {bad.numel()} points "
            "(outside the support?)"
        )
