"""The sparse Hessian in the units' latents of a model with several grouping
factors, by compressed Hessian-vector products.

Pattern. Units of one factor never share a term (that would couple them
outside any structure curvi knows; it is refused); units of two factors do
when an observation involves both (a subject and an item, a class and its
school). Which ones is read off the derivatives, per element of every term
of the log density, by :func:`~curvi.unit_split.find_unit_split` (the
long-format models' read-off) applied to each factor in turn; the finished
Hessian is checked against a Hessian-vector product along a random
direction.

Products. Each pair of factors that share terms has its block read from
the products of one of them (the assignment with the fewest products:
for subjects × items, the factor whose units meet fewer units of the
other). That factor's units are coloured so that two that meet a common
unit of a factor they serve differ; the product with the sum of one
colour's unit vectors (coordinate r of each) then holds, in each row of a
served unit, one entry of one column, and in each of its own rows its own
block. The count is Σ_f k_f × (colours of f): bounded by the design's
degree (how many units of one factor a unit meets), not by the number of
units; one product per coordinate for nested factors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .factors import FactorView
from .sparse_cholesky import SparsePattern, sparse_matvec
from .tensor_ops import grad as _grad
from .tensor_ops import hessian_rows
from .unit_split import find_unit_split

__all__ = ["HessianPattern", "hessian_pattern", "sparse_hessian"]


class HessianPattern(NamedTuple):
    """The pattern of the latents' Hessian and how to compute it.

    :ivar lower: the lower triangle as a :class:`~curvi.sparse_cholesky.SparsePattern`.
    :ivar products: ``(m, n)`` 0/1 directions of the m Hessian-vector products.
    :ivar reads: ``(4, nnz)``: entry e is ``½ (HV[reads[0, e], reads[1, e]] +
        HV[reads[2, e], reads[3, e]])``, HV the stacked products (the two
        reads differ in a unit's own block, where both halves are computed).
    :ivar edges: the unit graph's edges ``(E, 2)`` (unit ids, factor by factor).
    :ivar nested: whether the factors are nested: of every two factors that
        share terms, each unit of one meets a single unit of the other (a
        class its school; a chick its brood and its location). CHOLMOD's
        ordering then eliminates the finest units first, without fill.
    """

    lower: SparsePattern
    products: torch.Tensor
    reads: torch.Tensor
    edges: np.ndarray
    nested: bool

    @property
    def num_products(self) -> int:
        return self.products.shape[0]


def sparse_hessian(
    view: FactorView,
    theta: torch.Tensor,
    x: torch.Tensor,
    pattern: HessianPattern,
    *,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, gradient in ``x`` and the lower triangle of ``∂²log p/∂x²``
    (values on ``pattern.lower``) at ``(theta, x)``: one gradient and
    ``pattern.num_products`` Hessian-vector products.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import FactorView

        def model(subject, item, obs):
            with pyro.plate("subjects", 4):
                a = pyro.sample("a", dist.Normal(0.0, 1.0))
            with pyro.plate("items", 3):
                b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", len(obs)):
                pyro.sample("z", dist.Poisson((a[subject] + b[item]).exp()), obs=obs)

        subject, item = torch.arange(12) % 4, torch.arange(12) // 4
        view = FactorView(model, subject, item, torch.ones(12), unit_plate=("subjects", "items"))
        pattern = hessian_pattern(view, view.init_theta, view.init_y)
        log_prob, g, values = sparse_hessian(view, view.init_theta, view.init_y, pattern)
        pattern.lower.to_dense(values).shape   # (7, 7)

    :param bool create_graph: keep the results differentiable with respect
        to the history of ``theta`` and ``x``.
    """
    with torch.enable_grad():
        th = theta if create_graph and theta.requires_grad else theta.detach()
        xx = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        log_prob = view.log_joint(th, xx)
        (g,) = _grad(log_prob, (xx,), create_graph=True)
        products = pattern.products.to(dtype=x.dtype, device=x.device)
        m = products.shape[0]
        if g.requires_grad and not create_graph:  # one batched backward pass
            hv = hessian_rows(g, xx, products)
        elif g.requires_grad:
            rows = [
                _grad(
                    g,
                    (xx,),
                    grad_outputs=v,
                    create_graph=create_graph,
                    retain_graph=create_graph or j < m - 1,
                )[0]
                for j, v in enumerate(products)
            ]
            hv = torch.stack(rows)
        else:  # log density linear in x
            hv = products.new_zeros(products.shape)
    reads = pattern.reads.to(x.device)
    values = 0.5 * (hv[reads[0], reads[1]] + hv[reads[2], reads[3]])
    if create_graph:
        return log_prob, g, values
    return log_prob.detach(), g.detach(), values.detach()


def hessian_pattern(
    view: FactorView, theta: torch.Tensor, x: torch.Tensor, *, seed: int = 0
) -> HessianPattern:
    """Read the pattern of the latents' Hessian off the model (module
    docstring), colour it, and check it with one random product.

    :raises ValueError: when a term couples two units of one factor, or the
        Hessian has entries outside the pattern found.
    """
    generator = torch.Generator().manual_seed(seed)
    theta, x = theta.detach(), x.detach()
    units = _element_units(view, theta, x)  # (elements, F)
    unit_offset = np.cumsum((0,) + view.factor_sizes)[:-1]
    edges = []
    F = len(view.factor_sizes)
    for f in range(F):
        for g in range(f + 1, F):
            both = (units[:, f] >= 0) & (units[:, g] >= 0)
            pairs = np.stack([units[both, f] + unit_offset[f], units[both, g] + unit_offset[g]], -1)
            edges.append(np.unique(pairs, axis=0) if pairs.size else pairs.reshape(0, 2))
    edges = np.concatenate(edges).astype(np.int64) if edges else np.zeros((0, 2), dtype=np.int64)
    pattern = _pattern_from_edges(view, edges)
    _check_pattern(view, theta, x, pattern, generator)
    return pattern


# ------------------------------------------------------------------ pieces
def _element_units(view, theta, x):
    """For every element of every term, the unit of each factor it depends
    on (−1: none), ``(elements, F)``: :func:`~curvi.unit_split.find_unit_split`
    on each factor in turn, the other factors' latents held at ``x``. Raises
    when an element depends on two units of one factor."""
    sizes = [t.numel() for t in view.terms(theta, x).values()]
    columns = []
    for f in range(len(view.factor_sizes)):
        one = _OneFactor(view, x, f)
        split = find_unit_split(one, theta, one.block)
        parts = [
            torch.full((n,), -1, dtype=torch.long) if found is None else found.cpu()
            for n, found in zip(sizes, split.values())
        ]
        columns.append(torch.cat(parts).numpy())
    return np.stack(columns, -1)


class _OneFactor:
    """One factor of a :class:`FactorView` as :func:`~curvi.unit_split.find_unit_split`
    reads a view: its units' latents are the rows ``y``, the other factors'
    held at ``x``, and no term is per unit."""

    def __init__(self, view, x, f):
        self.view, self.unit_plate = view, view.unit_plate[f]
        start, size = view.factor_offsets[f], view.unit_index[f].numel()
        self.before, self.after = x[:start], x[start + size :]
        self.block = x[start : start + size].reshape(view.unit_index[f].shape)

    def _terms(self, theta, y, units):
        x = torch.cat([self.before, y.reshape(-1), self.after])
        return {name: (t, False) for name, t in self.view.terms(theta, x).items()}


def _pattern_from_edges(view, edges):
    """Products and reads for the pattern of ``edges`` (module docstring):
    each pair of factors that share terms has its block read from the
    products of one of them (the one needing fewer colours), whose units
    are coloured so that two sharing a neighbour there differ; a factor's
    own blocks come from its own products."""
    sizes, dims, offsets = view.factor_sizes, view.factor_dims, view.factor_offsets
    F = len(sizes)
    factor_of = np.repeat(np.arange(F), sizes)
    unit_in = np.concatenate([np.arange(N) for N in sizes])
    k_of = np.asarray(dims)[factor_of]
    start = np.asarray(offsets)[factor_of] + unit_in * k_of  # first coordinate of each unit
    num_units = factor_of.size
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    indptr = np.searchsorted(src, np.arange(num_units + 1))
    provider = _choose_providers(factor_of, dims, src, dst, F)
    colour = np.zeros(num_units, dtype=np.int64)
    for f in range(F):
        served = [g for g in range(F) if provider.get((min(f, g), max(f, g))) == f and g != f]
        colour[factor_of == f] = _partial_colouring(f, served, factor_of, indptr, dst, num_units)
    # products: one per (factor, colour, coordinate)
    product_of = {}
    rows_of_products = []
    for f in range(F):
        units = np.nonzero(factor_of == f)[0]
        for c in range(int(colour[units].max()) + 1):
            members = units[colour[units] == c]
            for r in range(dims[f]):
                product_of[(f, c, r)] = len(rows_of_products)
                rows_of_products.append(start[members] + r)
    n = view.latent_dim
    products = torch.zeros(len(rows_of_products), n, dtype=torch.float64)
    for j, coords in enumerate(rows_of_products):
        products[j, torch.as_tensor(coords)] = 1.0
    lookup = np.full((F, int(colour.max()) + 1, max(dims)), -1, dtype=np.int64)
    for (f, c, r), j in product_of.items():
        lookup[f, c, r] = j

    def product(units, r):
        return lookup[factor_of[units], colour[units], r]

    rows, cols, reads = [], [], []
    for f in range(F):  # own blocks: both reads, averaged
        k = dims[f]
        units = np.nonzero(factor_of == f)[0]
        rr, cc = np.tril_indices(k)
        u = np.repeat(units, rr.size)
        r_, c_ = np.tile(rr, units.size), np.tile(cc, units.size)
        rows.append(start[u] + r_)
        cols.append(start[u] + c_)
        reads.append(np.stack([product(u, c_), start[u] + r_, product(u, r_), start[u] + c_]))
    if edges.size:
        for fa in range(F):
            for fb in range(fa + 1, F):
                a, b = edges[:, 0], edges[:, 1]
                sel = (factor_of[a] == fa) & (factor_of[b] == fb)
                if not sel.any():
                    continue
                a, b = a[sel], b[sel]
                ra, rb = np.meshgrid(np.arange(dims[fa]), np.arange(dims[fb]), indexing="ij")
                ra, rb = ra.ravel(), rb.ravel()
                ua, ub = np.repeat(a, ra.size), np.repeat(b, ra.size)
                ra, rb = np.tile(ra, a.size), np.tile(rb, a.size)
                ia, ib = start[ua] + ra, start[ub] + rb
                if provider[(fa, fb)] == fa:
                    read = np.stack([product(ua, ra), ib])
                else:
                    read = np.stack([product(ub, rb), ia])
                rows.append(np.maximum(ia, ib))
                cols.append(np.minimum(ia, ib))
                reads.append(np.concatenate([read, read]))
    rows, cols, reads = np.concatenate(rows), np.concatenate(cols), np.concatenate(reads, axis=1)
    order = np.lexsort((rows, cols))
    rows, cols, reads = rows[order], cols[order], reads[:, order]
    lower = SparsePattern(n, torch.as_tensor(rows), torch.as_tensor(cols))
    return HessianPattern(lower, products, torch.as_tensor(reads), edges, _nested(factor_of, src, dst, F))


def _choose_providers(factor_of, dims, src, dst, F):
    """For each pair of factors that share terms, which one's products give
    their block: the assignment with the fewest products, each factor
    costing ``k_f ×`` (its largest count of units met by one unit of a
    factor it serves), a lower bound of its colours."""
    pairs = sorted({(min(a, b), max(a, b)) for a, b in zip(factor_of[src], factor_of[dst])})
    if not pairs:
        return {}
    # most units of f met by one unit of g
    degree = {}
    for f in range(F):
        for g in range(F):
            if f == g:
                continue
            sel = (factor_of[src] == g) & (factor_of[dst] == f)
            degree[(g, f)] = int(np.bincount(src[sel]).max()) if sel.any() else 0
    best, best_cost = None, None
    for choice in range(2 ** len(pairs)):
        provider = {pair: pair[(choice >> i) & 1] for i, pair in enumerate(pairs)}
        need = [1] * F
        for (f, g), p in provider.items():
            other = g if p == f else f
            need[p] = max(need[p], degree[(other, p)])
        cost = sum(d * m for d, m in zip(dims, need))
        if best_cost is None or cost < best_cost:
            best, best_cost = provider, cost
    return best


def _partial_colouring(f, served, factor_of, indptr, neighbours, num_units):
    """Colours of factor f's units such that two that meet a common unit of
    a served factor differ (greedy, most-connected first)."""
    units = np.nonzero(factor_of == f)[0]
    colour = np.full(num_units, -1, dtype=np.int64)
    served = np.asarray(served, dtype=np.int64)
    degree = indptr[units + 1] - indptr[units]
    for u in units[np.argsort(-degree, kind="stable")]:
        near = neighbours[indptr[u] : indptr[u + 1]]
        near = near[np.isin(factor_of[near], served)]
        if near.size:
            second = np.concatenate([neighbours[indptr[w] : indptr[w + 1]] for w in near])
            taken = colour[second[factor_of[second] == f]]
            taken = taken[taken >= 0]
        else:
            taken = np.zeros(0, dtype=np.int64)
        free = np.ones(taken.size + 1, dtype=bool)
        free[taken[taken <= taken.size]] = False
        colour[u] = int(np.argmax(free))
    return colour[units]


def _nested(factor_of, src, dst, F):
    """Whether, of every two factors that share terms, each unit of one
    meets at most one unit of the other."""
    for f in range(F):
        for g in range(f + 1, F):
            most = []
            for a, b in ((f, g), (g, f)):
                sel = (factor_of[src] == a) & (factor_of[dst] == b)
                most.append(int(np.bincount(src[sel]).max()) if sel.any() else 0)
            if min(most) > 1:
                return False
    return True


def _check_pattern(view, theta, x, pattern, generator):
    """One product along a random direction against the sparse Hessian."""
    _, _, values = sparse_hessian(view, theta, x, pattern)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(view.log_joint(theta, xx), xx, create_graph=True)
        hv = torch.autograd.grad(g, xx, v, allow_unused=True)[0] if g.requires_grad else torch.zeros_like(x)
    H = sparse_matvec(pattern.lower, values, v)
    err = (H - hv).abs().max()
    scale = hv.abs().max().clamp_min(1.0)
    if err > 1e-6 * scale:
        raise ValueError(
            f"the Hessian of the latents has entries outside the pattern read from the model "
            f"(|Hv − H_pattern v| = {float(err):.3g}); a term involves units in a way curvi "
            "could not read off its derivatives"
        )
