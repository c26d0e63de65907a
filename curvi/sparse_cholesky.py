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

__all__ = ["SparsePattern", "sparse_logdet", "sparse_solve", "sparse_inverse_subset"]


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
        self._analysis = None

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
        """``P A Pᵀ = L D Lᵀ`` by CHOLMOD (simplicial), A from ``values``.

        :raises NoLaplaceApproximation: when A is not positive definite.
        """
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
        cholmod.options["supernodal"] = 0  # simplicial L D Lᵀ: its factor can be read out
        try:
            F = cholmod.symbolic(A)
            cholmod.numeric(A, F)
        except ArithmeticError as error:
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
        L = cholmod.getfactor(F)  # (this turns F into a copy of the factor)
        colptr, rowind, vals = (np.array(t).ravel() for t in L.CCS)
        self.pattern, self.n = pattern, pattern.n
        self.colptr, self.rowind = colptr.astype(np.int64), rowind.astype(np.int64)
        starts = self.colptr[:-1]
        self.d = vals[starts].copy()  # D, stored on L's diagonal
        if not (self.d > 0).all():
            raise NoLaplaceApproximation(
                "the sparse Hessian is not negative definite at the modes: no Laplace approximation there"
            )
        vals = vals.copy()
        vals[starts] = 1.0
        self.values = vals
        self._csc = None

    @property
    def nnz(self) -> int:
        """Entries of L (diagonal included): the fill shows as nnz(L) − nnz(A)."""
        return self.rowind.size

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
    ``Z[S, i] = −Z[S, S] l``, ``Z[i, i] = 1/dᵢ − lᵀ Z[S, i]``. The dense
    trailing block of L (every row below present in its columns) is
    inverted at once."""
    n, colptr, rowind, vals = factor.n, factor.colptr, factor.rowind, factor.values
    counts = np.diff(colptr)
    # trailing columns t0..n-1 whose structure is complete: column j holds n - j entries
    dense = counts == n - np.arange(n)
    t0 = n
    while t0 > 0 and dense[t0 - 1]:
        t0 -= 1
    m = n - t0
    Lt = np.zeros((m, m))
    for j in range(t0, n):
        Lt[rowind[colptr[j] : colptr[j + 1]] - t0, j - t0] = vals[colptr[j] : colptr[j + 1]]
    if m:
        inv_l = np.linalg.solve(Lt, np.eye(m))  # L_t⁻¹ (unit lower)
        tail = (inv_l.T / factor.d[t0:]) @ inv_l
    else:
        tail = np.zeros((0, 0))
    Z = _SparseInverse(factor, t0, tail)
    for j in range(t0, n):  # the tail's own entries, for lookups by position
        Z.z[colptr[j] : colptr[j + 1]] = tail[rowind[colptr[j] : colptr[j + 1]] - t0, j - t0]
    for i in range(t0 - 1, -1, -1):
        lo, hi = colptr[i] + 1, colptr[i + 1]  # below the diagonal
        S, l = rowind[lo:hi], vals[lo:hi]
        if S.size == 0:
            Z.z[colptr[i]] = 1.0 / factor.d[i]
            continue
        a, b = np.meshgrid(S, S, indexing="ij")
        upper = a >= b
        block = np.empty(a.shape)
        block[upper] = Z.lookup(a[upper], b[upper])
        block.T[upper] = block[upper]
        column = -block @ l
        Z.z[lo:hi] = column
        Z.z[colptr[i]] = 1.0 / factor.d[i] - l @ column
    return Z


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
