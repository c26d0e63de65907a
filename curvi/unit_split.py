"""Which unit each element of a log-density term outside the unit plate belongs to.

A long-format model keeps its observations in a plate of their own and
indexes the unit latents, ``u[group]``: each observation's log probability
depends on one unit, but the plates do not say which. Per-unit integrals
(adaptive quadrature, docs/design.md §10) need the log density split by
unit, so :func:`find_unit_split` reads the assignment off the derivatives:
for a term ``t`` and random positive weights ``w`` on a unit's ``k``
coordinates, two backward passes give, per element j,

    b_j = Σᵢₗ wₗ ∂t_j/∂y_iₗ,    a_j = Σᵢₗ (i + 1) wₗ ∂t_j/∂y_iₗ,

and an element that depends on one unit g has ``a_j / b_j = g + 1`` exactly
(elements with ``b_j = 0`` depend on no unit there). Two points are
combined, and the split is verified: what is left unassigned must not
depend on the units' latents.
"""

from __future__ import annotations

import torch

from .tensor_ops import grad as _grad

__all__ = ["find_unit_split"]


def find_unit_split(view, theta: torch.Tensor, y: torch.Tensor, *, units=None, seed: int = 0) -> dict:
    """The unit (row of ``y``) of each element of each term of
    ``view._terms`` that is not already per unit: ``name -> LongTensor`` of
    the flattened term's size, ``-1`` for elements of no unit; ``None`` for
    a term that does not involve the units' latents.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model(group, obs):              # long format: observations index u[group]
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 3):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
            with pyro.plate("obs", len(group)):
                pyro.sample("z", dist.Normal(u[..., group], 1.0), obs=obs)

        group = torch.tensor([0, 2, 2, 1])
        view = ModelView(model, group, torch.zeros(4), unit_plate="groups")
        find_unit_split(view, view.init_theta, view.init_y)["z"]   # tensor([0, 2, 2, 1])

    :raises ValueError: when an element depends on several units, or the
        unassigned rest still depends on the units' latents.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    weights = (1 + torch.rand(y.shape[-1], generator=generator, dtype=y.dtype)).to(y.device)
    codes = torch.arange(1, y.shape[0] + 1, dtype=y.dtype, device=y.device).unsqueeze(-1)
    found = [_assign(view, theta, y0, units, weights, codes) for y0 in (y, y + 0.5 * noise)]
    split = {}
    for name, first in found[0].items():
        second = found[1][name]
        if first is None and second is None:
            split[name] = None
            continue
        if first is None or second is None:
            first = second if first is None else first
            second = first
        clash = (first >= 0) & (second >= 0) & (first != second)
        if clash.any():
            raise ValueError(
                f"term '{name}' has elements that depend on more than one unit of plate "
                f"'{view.unit_plate}'; curvi cannot split its log density by unit"
            )
        split[name] = torch.maximum(first, second)
    _check_rest_is_global(view, theta, y + 0.5 * noise, units, split)
    return split


def _assign(view, theta, y, units, weights, codes):
    yy = y.detach().requires_grad_(True)
    with torch.enable_grad():
        terms = view._terms(theta.detach(), yy, units)
        result = {}
        for name, (t, per_unit) in terms.items():
            if per_unit:
                continue
            t = t.reshape(-1)
            if not t.requires_grad:
                result[name] = None
                continue
            u = torch.zeros_like(t, requires_grad=True)
            (g,) = _grad((u * t).sum(), (yy,), create_graph=True)
            if not g.requires_grad:
                result[name] = None
                continue
            a, b = (
                _grad((g * w).sum(), (u,), retain_graph=True)[0]
                for w in (weights * codes, weights.expand_as(g))
            )
            involved = b != 0
            ratio = torch.where(involved, a / torch.where(involved, b, 1.0), 0.0)
            unit = ratio.round()
            if (involved & ((ratio - unit).abs() > 1e-6 * ratio.abs().clamp_min(1.0))).any():
                raise ValueError(
                    f"term '{name}' has elements that depend on more than one unit of plate "
                    f"'{view.unit_plate}'; curvi cannot split its log density by unit"
                )
            result[name] = torch.where(involved, unit.long() - 1, -1)
    return result


def _check_rest_is_global(view, theta, y, units, split):
    yy = y.detach().requires_grad_(True)
    with torch.enable_grad():
        rest = yy.new_zeros(())
        for name, (t, per_unit) in view._terms(theta.detach(), yy, units).items():
            if per_unit:
                continue
            assigned = split.get(name)
            t = t.reshape(-1)
            rest = rest + (t.sum() if assigned is None else t[assigned < 0].sum())
        (g,) = _grad(rest, (yy,))
    if g.abs().max() > 0:
        raise ValueError(
            "part of the log density outside the unit plate depends on the units' latents "
            "in a way curvi cannot split by unit (each element must depend on one unit)"
        )
