"""A sparse symmetric positive-definite matrix factorised by CHOLMOD, with a
log-determinant and solves that torch can differentiate.

The Hessian of a model with several grouping factors (crossed or nested
random effects, docs/design.md §11) is sparse with a pattern that no fixed
block shape captures. As lme4 and TMB do, it is factorised by CHOLMOD's
sparse Cholesky after CHOLMOD's fill-reducing ordering (AMD); nested
(tree-shaped) patterns are then eliminated leaves first, without fill.
CHOLMOD comes from cvxopt, which ships it in a wheel.

The matrix is given by its lower triangle on a fixed :class:`SparsePattern`
and a tensor of values. :func:`sparse_logdet` and :func:`sparse_solve` are
autograd functions of those values:

* ``∂ log|A| / ∂A_rc = (A⁻¹)_rc`` is needed only on the pattern of A, which
  lies inside the pattern of the factor: Takahashi's recursions give that
  *sparse inverse subset* from the factor ``P A Pᵀ = L D Lᵀ`` (as TMB
  differentiates its log-determinant), column by column from the last,
  the dense trailing block (where crossed designs put their fill) at once;
* ``x = A⁻¹ b``: ``∂/∂b = A⁻ᵀ``, ``∂/∂A_rc = −(A⁻¹ ḡ)_r x_c``.
"""

from __future__ import annotations

import numpy as np
import torch
from cvxopt import cholmod, matrix, spmatrix

from .modes import NoLaplaceApproximation

__all__ = [
    "SparsePattern",
    "sparse_draw",
    "sparse_inverse_subset",
    "sparse_logdet",
    "sparse_matvec",
    "sparse_solve",
]


class SparsePattern:
    """The lower triangle of a symmetric ``n × n`` sparsity pattern, and its
    CHOLMOD analysis (ordering and symbolic factor), made once.

    Usage::

        pattern = SparsePattern(3, torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 0]))
        values = torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64)  # A = [[4,1,0],[1,4,0],[0,0,4]]
        sparse_logdet(pattern, values)   # log 60

    :param int n: the matrix size.
    :param rows, cols: the lower triangle's entries (``rows >= cols``),
        every diagonal entry among them, no duplicates.
    """

    def __init__(self, n: int, rows: torch.Tensor, cols: torch.Tensor):
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64)
        cols = np.asarray(torch.as_tensor(cols).cpu(), dtype=np.int64)
        if rows.shape != cols.shape or rows.ndim != 1:
            raise ValueError("rows and cols must be 1-d index tensors of one length")
        if (rows < cols).any():
            raise ValueError("a SparsePattern holds the lower triangle: rows >= cols")
        if rows.size and (rows.max() >= n or cols.min() < 0):
            raise ValueError(f"pattern indices must lie in [0, {n})")
        keys = cols * n + rows
        if np.unique(keys).size != keys.size:
            raise ValueError("the pattern holds duplicate entries")
        diagonal = np.zeros(n, dtype=bool)
        diagonal[rows[rows == cols]] = True
        if not diagonal.all():
            raise ValueError(f"the pattern misses {int((~diagonal).sum())} diagonal entries")
        self.n, self.rows, self.cols = n, rows, cols
        self._rows_c, self._cols_c = matrix(rows), matrix(cols)
        self._analysis = None  # CHOLMOD's ordering, from the first factor

    @property
    def nnz(self) -> int:
        """Stored entries (the lower triangle)."""
        return self.rows.size

    def matrix(self, values: np.ndarray) -> spmatrix:
        return spmatrix(
            matrix(np.ascontiguousarray(values, dtype=np.float64)),
            self._rows_c,
            self._cols_c,
            (self.n, self.n),
        )

    def factor(self, values: torch.Tensor) -> Factor:
        """``P A Pᵀ = L D Lᵀ`` by CHOLMOD (supernodal), A from ``values``.

        :raises NoLaplaceApproximation: when A is not positive definite.
        :raises ValueError: for values of the wrong shape, or not finite.
        """
        if values.shape != (self.nnz,):
            raise ValueError(
                f"values must have shape ({self.nnz},), one per pattern entry; got {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all():
            raise ValueError(f"{int((~torch.isfinite(values)).sum())} of the matrix's values are not finite")
        return Factor(self, values.detach().cpu().numpy())

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The symmetric matrix as a dense tensor (for tests and small cases)."""
        dense = values.new_zeros(self.n, self.n)
        r, c = torch.as_tensor(self.rows), torch.as_tensor(self.cols)
        dense = dense.index_put((r, c), values)
        return dense + dense.T - torch.diag(dense.diagonal())


class Factor:
    """A numeric factor ``P A Pᵀ = L D Lᵀ`` (L unit lower triangular, in
    compressed columns) with its permutation: solves, the log-determinant,
    draws and the sparse inverse subset."""

    def __init__(self, pattern: SparsePattern, values: np.ndarray):
        A = pattern.matrix(values)
        options = dict(cholmod.options)
        cholmod.options["supernodal"] = 2  # supernodal: 5x faster here; read out as L Lᵀ
        try:
            # the fill-reducing ordering depends on the pattern alone: AMD once per pattern
            if pattern._analysis is None:
                F = cholmod.symbolic(A)
            else:
                F = cholmod.symbolic(A, p=matrix(pattern._analysis))
            try:
                cholmod.numeric(A, F)
            except ArithmeticError as error:  # CHOLMOD: not positive definite
                raise NoLaplaceApproximation(
                    f"the sparse Hessian is not negative definite at the modes ({error}): no "
                    "Laplace approximation there"
                ) from None
        finally:
            cholmod.options.clear()
            cholmod.options.update(options)
        probe = matrix(np.arange(pattern.n, dtype=np.float64))
        cholmod.solve(F, probe, sys=8)
        #: the elimination order: ``L D Lᵀ`` factors ``A[order][:, order]``
        self.order = np.argsort(np.array(probe).ravel().astype(np.int64))
        if pattern._analysis is None:
            pattern._analysis = self.order.copy()
        L = cholmod.getfactor(F)  # (this turns F into a copy of the factor)
        colptr, rowind, vals = (np.array(t).ravel() for t in L.CCS)
        self.pattern, self.n = pattern, pattern.n
        self.colptr, self.rowind = colptr.astype(np.int64), rowind.astype(np.int64)
        starts = self.colptr[:-1]
        root = vals[starts].copy()  # the Cholesky factor's diagonal: L_chol = L D^{1/2}
        if not (root > 0).all():
            raise NoLaplaceApproximation(
                "the sparse Hessian is not negative definite at the modes: no Laplace approximation there"
            )
        self.d = root**2
        self.values = vals / np.repeat(root, np.diff(self.colptr))  # unit lower triangular
        self._csc = None

    @property
    def nnz(self) -> int:
        """Nonzero entries of L (diagonal included; not the zeros CHOLMOD's
        supernodes store): the fill shows as nnz(L) − nnz(A)."""
        return int(np.count_nonzero(self.values))

    def logdet(self) -> float:
        return float(np.log(self.d).sum())

    def _L(self):
        if self._csc is None:
            import scipy.sparse as sp

            self._csc = sp.csc_matrix((self.values, self.rowind, self.colptr), shape=(self.n, self.n))
        return self._csc

    def solve(self, b: np.ndarray) -> np.ndarray:
        """``A⁻¹ b`` for b of shape ``(n,)`` or ``(n, m)``."""
        from scipy.sparse.linalg import spsolve_triangular

        L = self._L()
        rhs = b[self.order]
        z = spsolve_triangular(L, rhs, lower=True, unit_diagonal=True)
        z = (z.T / self.d).T
        x = spsolve_triangular(L.T.tocsr(), z, lower=False, unit_diagonal=True)
        out = np.empty_like(x)
        out[self.order] = x
        return out

    def multiply(self, eps: np.ndarray) -> np.ndarray:
        """``C ε = Pᵀ L D^{1/2} ε``, the factor ``A = C Cᵀ`` applied to ε."""
        z = self._L() @ (eps.T * np.sqrt(self.d)).T
        out = np.empty_like(z)
        out[self.order] = z
        return out

    def draw(self, eps: np.ndarray) -> np.ndarray:
        """``x = Pᵀ L⁻ᵀ D^{-1/2} ε``: for ε standard normal, x ~ N(0, A⁻¹)."""
        from scipy.sparse.linalg import spsolve_triangular

        z = (eps.T / np.sqrt(self.d)).T
        x = spsolve_triangular(self._L().T.tocsr(), z, lower=False, unit_diagonal=True)
        out = np.empty_like(x)
        out[self.order] = x
        return out

    def inverse_on_pattern(self) -> np.ndarray:
        """``(A⁻¹)_rc`` on the pattern's entries (Takahashi's recursions)."""
        position = np.argsort(self.order)  # original index -> position in the elimination
        Z = _takahashi(self)
        i = position[self.pattern.rows]
        j = position[self.pattern.cols]
        return Z.lookup(np.maximum(i, j), np.minimum(i, j))


class _SparseInverse:
    """``Z = (L D Lᵀ)⁻¹`` on the pattern of L, plus the dense trailing block."""

    def __init__(self, factor, tail_start, tail):
        self.f, self.t0, self.tail = factor, tail_start, tail
        self.z = np.zeros(factor.rowind.size)
        self.keys = np.repeat(np.arange(factor.n), np.diff(factor.colptr)) * factor.n + factor.rowind

    def lookup(self, rows, cols):
        """Entries ``Z[rows, cols]`` with rows >= cols, all on L's pattern."""
        out = np.empty(rows.shape)
        in_tail = cols >= self.t0
        out[in_tail] = self.tail[rows[in_tail] - self.t0, cols[in_tail] - self.t0]
        sparse = ~in_tail
        if sparse.any():
            at = np.searchsorted(self.keys, cols[sparse] * self.f.n + rows[sparse])
            out[sparse] = self.z[at]
        return out


def _takahashi(factor: Factor) -> _SparseInverse:
    """The sparse inverse subset: for i = n−1, ..., 0 with S the rows of
    column i below the diagonal and l = L[S, i],
    ``Z[S, i] = −Z[S, S] l``, ``Z[i, i] = 1/dᵢ − lᵀ Z[S, i]``. The trailing
    block where the fill is dense (the last factor of a crossed design, which
    the ordering puts last) is inverted at once: its part of ``A⁻¹`` is the
    inverse of its Schur complement ``L_t D_t L_tᵀ``."""
    from scipy.linalg import solve_triangular

    n, colptr, rowind, vals = factor.n, factor.colptr, factor.rowind, factor.values
    t0 = _dense_tail_start(colptr)
    m = n - t0
    if m:
        Lt = np.zeros((m, m))
        cols = np.repeat(np.arange(n), np.diff(colptr))
        sel = cols >= t0
        Lt[rowind[sel] - t0, cols[sel] - t0] = vals[sel]
        inv_l = solve_triangular(Lt, np.eye(m), lower=True, unit_diagonal=True)
        tail = (inv_l.T / factor.d[t0:]) @ inv_l
    else:
        tail = np.zeros((0, 0))
    Z = _SparseInverse(factor, t0, tail)
    # the other columns by levels: a column needs the columns of its rows
    # below the diagonal, so the columns of one level are done at once
    counts = np.diff(colptr) - 1  # entries below the diagonal
    level = np.zeros(n, dtype=np.int64)
    for i in range(t0 - 1, -1, -1):
        below = rowind[colptr[i] + 1 : colptr[i + 1]]
        level[i] = 1 + (level[below].max() if below.size else 0)
    for step in range(1, int(level[:t0].max(initial=0)) + 1):
        columns = np.nonzero(level[:t0] == step)[0]
        size = counts[columns]
        lo = colptr[columns] + 1
        # every pair (a, b) of below-diagonal entries of each column
        pairs = size**2
        column_of_pair = np.repeat(np.arange(columns.size), pairs)
        t = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs)
        s_ = size[column_of_pair]
        pa = lo[column_of_pair] + t // s_
        pb = lo[column_of_pair] + t % s_
        ra, rb = rowind[pa], rowind[pb]
        z = Z.lookup(np.maximum(ra, rb), np.minimum(ra, rb))
        # Z[S, i] = −Z[S, S] l, entry by entry
        entries = np.arange(pa.min(initial=0), pa.max(initial=-1) + 1)
        column = -np.bincount(pa - entries[:1].sum(), weights=z * vals[pb], minlength=entries.size)
        below = np.concatenate([np.arange(a, a + k) for a, k in zip(lo, size)]) if size.sum() else entries[:0]
        Z.z[below] = column[below - entries[:1].sum()]
        # Z[i, i] = 1/dᵢ − lᵀ Z[S, i]
        owner = np.repeat(np.arange(columns.size), size)
        Z.z[colptr[columns]] = 1.0 / factor.d[columns] - np.bincount(
            owner, weights=vals[below] * Z.z[below], minlength=columns.size
        )
    return Z


#: the largest trailing block inverted densely, and the density it needs
_MAX_DENSE_TAIL, _DENSE_TAIL_DENSITY = 4096, 0.2


def _dense_tail_start(colptr):
    """Where the dense trailing block of L starts: the largest trailing
    block (at most _MAX_DENSE_TAIL columns) whose lower triangle is at least
    _DENSE_TAIL_DENSITY full; always at least the last column."""
    n = colptr.size - 1
    if n == 0:
        return 0
    counts = np.diff(colptr)
    m = np.arange(1, min(n, _MAX_DENSE_TAIL) + 1)  # block sizes
    nnz = np.cumsum(counts[::-1])[: m.size]  # entries in the last m columns
    good = nnz >= _DENSE_TAIL_DENSITY * m * (m + 1) / 2
    return n - int(m[good].max())


def sparse_inverse_subset(pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """``(A⁻¹)_rc`` on the pattern's entries, as a tensor like ``values``.

    Usage::

        pattern = SparsePattern(2, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        sparse_inverse_subset(pattern, torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
        # [2/3, 2/3, -1/3]
    """
    z = pattern.factor(values).inverse_on_pattern()
    return torch.as_tensor(z, dtype=values.dtype, device=values.device)


class _LogDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, pattern):
        factor = pattern.factor(values)
        ctx.factor, ctx.pattern = factor, pattern
        return values.new_tensor(factor.logdet())

    @staticmethod
    def backward(ctx, grad):
        z = torch.as_tensor(ctx.factor.inverse_on_pattern(), dtype=grad.dtype, device=grad.device)
        off = torch.as_tensor(ctx.pattern.rows != ctx.pattern.cols, device=grad.device)
        return grad * torch.where(off, 2 * z, z), None


class _Solve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, b, pattern):
        if b.dim() not in (1, 2) or b.shape[0] != pattern.n:
            raise ValueError(f"b must have shape ({pattern.n},) or ({pattern.n}, m); got {tuple(b.shape)}")
        factor = pattern.factor(values)
        x = torch.as_tensor(factor.solve(b.detach().cpu().numpy()), dtype=b.dtype, device=b.device)
        ctx.factor, ctx.pattern = factor, pattern
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gb = torch.as_tensor(
            ctx.factor.solve(grad.detach().cpu().numpy()), dtype=grad.dtype, device=grad.device
        )
        r = torch.as_tensor(ctx.pattern.rows, device=grad.device)
        c = torch.as_tensor(ctx.pattern.cols, device=grad.device)
        if x.dim() == 1:
            gv = -(gb[r] * x[c] + gb[c] * x[r])
        else:
            gv = -(gb[r] * x[c] + gb[c] * x[r]).sum(-1)
        gv = torch.where(r == c, 0.5 * gv, gv)
        return gv, gb, None


def sparse_draw(pattern: SparsePattern, values: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A draw of ``N(0, A⁻¹)`` from standard-normal ``eps`` (``(n,)`` or
    ``(n, m)``), reparameterised: differentiable in ``values``.

    With ``A = C Cᵀ`` the factor at the current values (held fixed),
    ``z = ½ (A⁻¹ C ε + C⁻ᵀ ε)`` is ``C⁻ᵀ ε`` (a draw of ``N(0, A⁻¹)``), and
    its derivative ``−½ A⁻¹ dA A⁻¹ C ε`` moves the covariance ``E[z zᵀ]``
    by exactly ``d(A⁻¹)``: pathwise gradients of ``E f(z)`` are unbiased,
    through one differentiable sparse solve.

    Usage::

        pattern = SparsePattern(2, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        A = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
        z = sparse_draw(pattern, A, torch.randn(2, dtype=torch.float64))
        z.sum().backward()   # A.grad: the pathwise gradient
    """
    factor = pattern.factor(values)
    e = eps.detach().cpu().numpy()
    like = dict(dtype=values.dtype, device=values.device)
    c_eps = torch.as_tensor(factor.multiply(e), **like)
    draw = torch.as_tensor(factor.draw(e), **like)
    return 0.5 * (sparse_solve(pattern, values, c_eps) + draw)


def sparse_matvec(pattern: SparsePattern, values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A v`` for ``v`` of shape ``(n,)`` or ``(n, m)``, differentiable.

    Usage::

        pattern = SparsePattern(2, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        sparse_matvec(pattern, torch.tensor([2.0, 2.0, 1.0]), torch.tensor([1.0, 0.0]))   # [2, 1]
    """
    r = torch.as_tensor(pattern.rows, device=v.device)
    c = torch.as_tensor(pattern.cols, device=v.device)
    vals = values if v.dim() == 1 else values.unsqueeze(-1)
    out = torch.zeros_like(v).index_add(0, r, vals * v[c])
    off = r != c
    return out.index_add(0, c[off], vals[off] * v[r[off]])


def sparse_logdet(pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """``log det A`` for the positive-definite A given by its lower-triangle
    ``values`` on ``pattern``; differentiable in ``values`` (the gradient is
    A⁻¹ on the pattern, off-diagonal entries counted twice).

    :raises NoLaplaceApproximation: when A is not positive definite.
    """
    return _LogDet.apply(values, pattern)


def sparse_solve(pattern: SparsePattern, values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A⁻¹ b`` (b of shape ``(n,)`` or ``(n, m)``), differentiable in
    ``values`` and ``b``.

    Usage::

        pattern = SparsePattern(2, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        A = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)   # [[2, 1], [1, 2]]
        sparse_solve(pattern, A, torch.tensor([3.0, 3.0], dtype=torch.float64))   # [1, 1]
    """
    return _Solve.apply(values, b, pattern)
