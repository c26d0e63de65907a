"""
The block-arrowhead precision of a hierarchical model and its factorisation.

Conventions (shared by :mod:`curvi.hessian` and the guides):

* Coordinates are ordered ``(θ, y)``: the ``p`` global coordinates, then the
  ``N`` units' local vectors unit-major (dense index ``p + i·k + l``).
* A symmetric matrix of this structure is given by its blocks::

      P = [[A, Bᵀ],      A: (p, p)
           [B, D ]]      B: (N, k, p), Bᵢ = rows of unit i, columns global
                         D: (N, k, k), the block-diagonal local part

* Vectors are pairs ``(v_theta, v_y)`` of shapes ``(..., p)`` and
  ``(..., N, k)``; leading batch dimensions (e.g. particles) broadcast, the
  blocks themselves are unbatched.

:class:`ArrowheadPrecision` factors ``P`` without fill-in by eliminating the
units first: ``Dᵢ = Lᵢ Lᵢᵀ``, ``Wᵢ = Lᵢ⁻¹ Bᵢ`` and the Schur complement
``S = A − Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ = L_S L_Sᵀ``, all in ``O(N k³ + N k² p + p³)``.
See docs/design.md §2. :class:`PrecisionCholeskyNormal` is the Gaussian of a
Cholesky factor of its precision: the form in which the arrowhead's marginal
of θ and its conditionals of the units are sampled, without factorising
anything again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import _standard_normal

from curvi.repair import Jitter, SpectralRepair, as_repair

from .tensor_ops import symmetrize

__all__ = [
    "ArrowheadCholesky",
    "ArrowheadPrecision",
    "PrecisionCholeskyNormal",
    "RepairReport",
    "arrowhead_matvec",
    "arrowhead_to_dense",
]

_MAX_LISTED_UNITS = 5  # unit indices quoted in error messages


# ---------------------------------------------------------------------------
# validation helpers


def _check_blocks(A, B, D):
    """Validate block shapes, dtype and device; return ``(p, N, k)``."""
    for name, t, dim in (("A", A, 2), ("B", B, 3), ("D", D, 3)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name}: expected a {dim}-dimensional tensor, given shape {tuple(t.shape)}")
    p, (N, k, p_b) = A.shape[0], B.shape
    if A.shape != (p, p):
        raise ValueError(f"A: expected a square (p, p) matrix, given shape {tuple(A.shape)}")
    if p_b != p:
        raise ValueError(f"B: expected shape (N, k, p) = (N, k, {p}) to match A, given {tuple(B.shape)}")
    if D.shape != (N, k, k):
        raise ValueError(
            f"D: expected shape (N, k, k) = {(N, k, k)} from B of shape "
            f"{tuple(B.shape)}, given {tuple(D.shape)}"
        )
    for name, t in (("B", B), ("D", D)):
        if t.dtype != A.dtype:
            raise ValueError(f"{name}: expected dtype {A.dtype} (that of A), given {t.dtype}")
        if t.device != A.device:
            raise ValueError(f"{name}: expected device {A.device} (that of A), given {t.device}")
    if not A.dtype.is_floating_point:
        raise ValueError(f"A, B, D: expected a floating point dtype, given {A.dtype}")
    return p, N, k


def _check_finite(**blocks):
    for name, t in blocks.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains non-finite values (NaN or inf)")


def _check_pair(v, p, N, k, name="v"):
    """Validate a vector pair ``(v_theta, v_y)`` against ``(p, N, k)``."""
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        raise ValueError(f"{name}: expected a pair (v_theta, v_y), given {type(v).__name__}")
    v_theta, v_y = v
    if v_theta.dim() < 1 or v_theta.shape[-1] != p:
        raise ValueError(f"{name}[0] (theta part): expected shape (..., {p}), given {tuple(v_theta.shape)}")
    if v_y.dim() < 2 or v_y.shape[-2:] != (N, k):
        raise ValueError(f"{name}[1] (y part): expected shape (..., {N}, {k}), given {tuple(v_y.shape)}")
    return v_theta, v_y


def _first_units(mask):
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:_MAX_LISTED_UNITS])
    return len(idx), shown + (", ..." if len(idx) > _MAX_LISTED_UNITS else "")


# ---------------------------------------------------------------------------
# batched triangular solves on vectors


def _tri_solve(L, v, transpose=False):
    """Solve ``L x = v`` (or ``Lᵀ x = v``) for lower ``L``, vectors in the last dim.

    ``v``'s batch dimensions broadcast against ``L``'s; those to the left of
    ``L``'s (e.g. particles) become columns of one solve, so ``L`` is not
    copied once per particle.
    """
    M = L.mT if transpose else L
    extra = v.dim() - L.dim() + 1
    if extra <= 0:
        return torch.linalg.solve_triangular(M, v.unsqueeze(-1), upper=transpose).squeeze(-1)
    lead, d = v.shape[:extra], v.shape[-1]
    rest = torch.broadcast_shapes(v.shape[extra:-1], L.shape[:-2])
    columns = v.expand(lead + rest + (d,)).reshape((math.prod(lead),) + rest + (d,)).movedim(0, -1)
    x = torch.linalg.solve_triangular(M.expand(rest + (d, d)), columns, upper=transpose)
    return x.movedim(-1, 0).reshape(lead + rest + (d,))


def _tri_matvec(L, v, transpose=False):
    """``L v`` or ``Lᵀ v`` with vectors in the last dim."""
    M = L.mT if transpose else L
    return (M @ v.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------
# module-level helpers shared with curvi.hessian


def _block_diag(D):
    """``(N, k, k) → (N k, N k)`` block-diagonal matrix."""
    N, k, _ = D.shape
    eye_n = torch.eye(N, dtype=D.dtype, device=D.device)
    return (D[:, :, None, :] * eye_n[:, None, :, None]).reshape(N * k, N * k)


def arrowhead_to_dense(A: torch.Tensor, B: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """
    The dense ``(p + N k, p + N k)`` matrix ``[[A, Bᵀ], [B, blockdiag(D)]]``
    in the ``(θ, y)`` ordering. For tests and small problems only.

    Usage::

        A, B, D = torch.eye(2), torch.zeros(3, 1, 2), torch.ones(3, 1, 1)
        arrowhead_to_dense(A, B, D).shape   # torch.Size([5, 5])

    :param torch.Tensor A: global block, ``(p, p)``.
    :param torch.Tensor B: cross blocks, ``(N, k, p)``.
    :param torch.Tensor D: local blocks, ``(N, k, k)``.
    :rtype: torch.Tensor
    """
    p, N, k = _check_blocks(A, B, D)
    B_flat = B.reshape(N * k, p)
    top = torch.cat([A, B_flat.mT], dim=-1)
    bottom = torch.cat([B_flat, _block_diag(D)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def arrowhead_matvec(
    A: torch.Tensor, B: torch.Tensor, D: torch.Tensor, v: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The product ``P v`` of the arrowhead ``P = [[A, Bᵀ], [B, D]]`` with a
    vector pair, batched over ``v``'s leading dimensions.

    Usage::

        A, B, D = torch.eye(2), torch.zeros(3, 1, 2), torch.ones(3, 1, 1)
        v = (torch.ones(2), torch.ones(3, 1))
        arrowhead_matvec(A, B, D, v)   # (tensor([1., 1.]), tensor([[1.], [1.], [1.]]))

    :param torch.Tensor A: global block, ``(p, p)``.
    :param torch.Tensor B: cross blocks, ``(N, k, p)``.
    :param torch.Tensor D: local blocks, ``(N, k, k)``.
    :param tuple v: ``(v_theta, v_y)`` of shapes ``(..., p)``, ``(..., N, k)``.
    :return: the pair ``(P v)_theta, (P v)_y`` with the same layout.
    :rtype: tuple
    """
    p, N, k = _check_blocks(A, B, D)
    v_theta, v_y = _check_pair(v, p, N, k)
    out_theta = _tri_matvec(A, v_theta) + torch.einsum("nkp,...nk->...p", B, v_y)
    out_y = torch.einsum("nkp,...p->...nk", B, v_theta) + _tri_matvec(D, v_y)
    return out_theta, out_y


# ---------------------------------------------------------------------------
# result types


class ArrowheadCholesky(NamedTuple):
    """
    The no-fill-in Cholesky factor of an arrowhead precision, eliminating the
    units first, i.e. of ``P`` permuted to the ``(y, θ)`` ordering::

        P_(y,θ) = [[blockdiag(D), B_flat], [B_flatᵀ, A]] = L Lᵀ,
        L = [[blockdiag(L_D), 0], [Wᵀ, L_S]]

    with ``B_flat = B.reshape(N k, p)`` and ``W`` flattened the same way.

    Usage::

        chol = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                  torch.ones(3, 1, 1)).cholesky
        chol.to_dense().shape   # torch.Size([5, 5]), rows in (y, θ) order

    :ivar torch.Tensor L_D: ``(N, k, k)`` lower Cholesky factors of the ``Dᵢ``.
    :ivar torch.Tensor W: ``(N, k, p)``, ``Wᵢ = Lᵢ⁻¹ Bᵢ``.
    :ivar torch.Tensor L_S: ``(p, p)`` lower Cholesky factor of the Schur
        complement ``S = A − Σᵢ Wᵢᵀ Wᵢ``.
    """

    L_D: torch.Tensor
    W: torch.Tensor
    L_S: torch.Tensor

    def to_dense(self) -> torch.Tensor:
        """
        The dense lower-triangular factor ``L`` in the ``(y, θ)`` ordering
        (see the class docstring), so that ``L Lᵀ`` is ``P`` with its
        ``θ`` block moved last. For tests.

        :rtype: torch.Tensor
        """
        N, k, p = self.W.shape
        top = torch.cat([_block_diag(self.L_D), self.W.new_zeros(N * k, p)], dim=-1)
        bottom = torch.cat([self.W.reshape(N * k, p).mT, self.L_S], dim=-1)
        return torch.cat([top, bottom], dim=-2)


class RepairReport(NamedTuple):
    """
    What a repair did to an :class:`ArrowheadPrecision`.

    Usage::

        D = torch.tensor([[[-1.0]], [[2.0]]])   # unit 0 indefinite
        P = ArrowheadPrecision(torch.eye(1), torch.zeros(2, 1, 1), D, repair="clip")
        print(P.report)
        # repair: 1 of 2 local blocks repaired (1 indefinite); Schur complement kept

    :ivar int num_units: number of local blocks ``N``.
    :ivar int local_repaired: blocks with an eigenvalue moved by more than
        ``1e-3`` relative (``|f(λ) − λ| > 1e-3 |λ|``).
    :ivar int local_indefinite: blocks with ``λ_min ≤ 0`` before repair.
    :ivar bool schur_repaired: whether the Schur complement was moved likewise.
    :ivar bool schur_indefinite: whether it had ``λ_min ≤ 0`` before repair.
    """

    num_units: int
    local_repaired: int
    local_indefinite: int
    schur_repaired: bool
    schur_indefinite: bool

    def __str__(self):
        schur = "repaired" if self.schur_repaired else "kept"
        if self.schur_indefinite:
            schur += " (indefinite)"
        return (
            f"repair: {self.local_repaired} of {self.num_units} local blocks repaired "
            f"({self.local_indefinite} indefinite); Schur complement {schur}"
        )


def _eliminate(L_D, B):
    """``Wᵢ = Lᵢ⁻¹ Bᵢ`` and ``Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ = Σᵢ Wᵢᵀ Wᵢ``."""
    W = torch.linalg.solve_triangular(L_D, B, upper=False)
    return W, symmetrize(torch.einsum("nkp,nkq->pq", W, W))


def _moved(before, after):
    """Per matrix: did any eigenvalue move by more than 1e-3 relative?"""
    return ((after - before).abs() > 1e-3 * before.abs()).any(-1)


# ---------------------------------------------------------------------------
# the precision


class ArrowheadPrecision:
    """
    A positive-definite block-arrowhead precision ``P = [[A, Bᵀ], [B, D]]``
    (module docstring for the layout), factored once at construction.

    Without ``repair`` the blocks must give a positive-definite ``P``;
    otherwise a ``ValueError`` names the failing unit blocks or the Schur
    complement. With ``repair`` every ``Dᵢ`` is repaired, then the Schur
    complement ``S`` computed from the repaired blocks is repaired, and the
    stored blocks are ``A' = S' + Σ Bᵢᵀ Dᵢ'⁻¹ Bᵢ``, ``B``, ``D'``: every method
    refers to this one repaired PD matrix, and all are differentiable with
    respect to ``A``, ``B``, ``D``. ``A`` and ``D`` are symmetrised as
    ``(M + Mᵀ) / 2``. Costs ``O(N k³ + N k² p + p³)``; the dense matrix is
    never built except by :meth:`to_dense`.

    Usage::

        N, k, p = 100, 2, 3
        A = 10 * torch.eye(p)
        B = 0.1 * torch.randn(N, k, p)
        D = -torch.eye(k).expand(N, k, k)          # indefinite
        P = ArrowheadPrecision(A, B, D, repair="softabs")
        print(P.report)
        eps = (torch.randn(8, p), torch.randn(8, N, k))
        delta = P.sample(eps)                      # 8 draws of N(0, P⁻¹)
        P.log_prob(delta, (torch.zeros(p), torch.zeros(N, k)))   # shape (8,)

    :param torch.Tensor A: global block ``(p, p)``, symmetric.
    :param torch.Tensor B: cross blocks ``(N, k, p)``.
    :param torch.Tensor D: local blocks ``(N, k, k)``, symmetric.
    :param repair: ``None`` (require PD), ``"softabs"``, ``"softplus"``,
        ``"clip"``, ``"jitter"`` or a repair object; see
        :func:`curvi.repair.as_repair`.
    :param reduce: applied to this piece's ``A − Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ`` before it is
        repaired and factored: :func:`curvi.distributed.sum_over_ranks` when
        the units are shared among processes (``A`` is then this process's
        share of the global block, and the precision holds only its units:
        :meth:`log_det`, :meth:`to_dense` and the stored ``A`` are this
        process's piece, with the global Schur complement).
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        D: torch.Tensor,
        *,
        repair: SpectralRepair | Jitter | str | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self._p, self._N, self._k = _check_blocks(A, B, D)
        _check_finite(A=A, B=B, D=D)
        self._repair = as_repair(repair)
        self._reduce = (lambda S: S) if reduce is None else reduce
        A, D = symmetrize(A), symmetrize(D)
        if self._repair is None:
            self._factor_exact(A, B, D)
        else:
            self._factor_repaired(A, B, D)

    # -- construction -------------------------------------------------------

    def _factor_exact(self, A, B, D):
        L_D, info = torch.linalg.cholesky_ex(D)
        if (info > 0).any():
            count, shown = _first_units(info > 0)
            raise ValueError(
                f"ArrowheadPrecision: {count} of {self._N} local blocks D[i] are not "
                f"positive definite (units {shown}); pass repair='softabs' (or "
                "'softplus', 'clip', 'jitter') to repair them"
            )
        W, BtDinvB = _eliminate(L_D, B)
        S = self._reduce(symmetrize(A - BtDinvB))
        L_S, info = torch.linalg.cholesky_ex(S)
        if info > 0:
            raise ValueError(
                "ArrowheadPrecision: the Schur complement S = A - sum_i B_i^T D_i^-1 B_i "
                "is not positive definite (all local blocks are); pass "
                "repair='softabs' (or 'softplus', 'clip', 'jitter') to repair it"
            )
        self._store(A, B, D, S, ArrowheadCholesky(L_D, W, L_S), report=None)

    def _factor_repaired(self, A, B, D):
        D_rep = self._repair(D)
        L_D = torch.linalg.cholesky(D_rep.matrix)
        W, BtDinvB = _eliminate(L_D, B)
        S_rep = self._repair(self._reduce(symmetrize(A - BtDinvB)))
        L_S = torch.linalg.cholesky(S_rep.matrix)
        report = RepairReport(
            num_units=self._N,
            local_repaired=int(_moved(D_rep.eigvals_before, D_rep.eigvals_after).sum()),
            local_indefinite=int((D_rep.eigvals_before[..., :1] <= 0).sum()),
            schur_repaired=bool(_moved(S_rep.eigvals_before, S_rep.eigvals_after)),
            schur_indefinite=bool((S_rep.eigvals_before[..., :1] <= 0).any()),
        )
        cholesky = ArrowheadCholesky(L_D, W, L_S)
        self._store(S_rep.matrix + BtDinvB, B, D_rep.matrix, S_rep.matrix, cholesky, report)

    def _store(self, A, B, D, S, cholesky, report, M=None):
        self._A, self._B, self._D, self._S = A, B, D, S
        self._cholesky, self._report, self._M = cholesky, report, M

    def _new(self, A, B, D, S, cholesky, M=None):
        """Another precision of the same shape and repair from given factors."""
        new = object.__new__(type(self))
        new._p, new._N, new._k, new._repair = self._p, self._N, self._k, self._repair
        new._reduce = self._reduce
        new._store(A, B, D, S, cholesky, self._report, M)
        return new

    def with_schur(self, S: torch.Tensor, *, cross_scale: float = 1.0) -> ArrowheadPrecision:
        """
        The arrowhead precision with the same local blocks ``D``, cross blocks
        ``cross_scale · B`` and Schur complement ``S`` (so
        ``A = S + cross_scale² Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ``): the Gaussian whose marginal of
        θ has precision ``S`` and whose conditionals of the units are
        ``N(−cross_scale · Dᵢ⁻¹ Bᵢ δ_θ, Dᵢ⁻¹)``. The factors of the ``Dᵢ`` are
        reused; only ``S`` is factored, and not even it when it is
        :attr:`schur` itself. Differentiable in ``S`` and in this precision.

        Usage::

            P = ArrowheadPrecision(4 * torch.eye(2), torch.ones(3, 1, 2), 4 * torch.ones(3, 1, 1))
            Q = P.with_schur(2 * torch.eye(2))
            Q.schur, Q.M.equal(P.M)   # 2 I, True

        :param torch.Tensor S: positive-definite ``(p, p)``.
        :param float cross_scale: factor on the cross blocks (and on ``M``).
        :raises ValueError: when ``S`` has the wrong shape or is not positive definite.
        """
        if tuple(S.shape) != (self._p, self._p):
            raise ValueError(f"S: expected shape {(self._p, self._p)}, given {tuple(S.shape)}")
        L_D, W, L_S = self._cholesky
        if S is not self._S:
            L_S, info = torch.linalg.cholesky_ex(S)
            if info > 0:
                raise ValueError("with_schur: S is not positive definite")
        if cross_scale != 1.0:
            W = cross_scale * W
        M = None if self._M is None else cross_scale * self._M
        BtDinvB = symmetrize(torch.einsum("nkp,nkq->pq", W, W))
        return self._new(S + BtDinvB, cross_scale * self._B, self._D, S, ArrowheadCholesky(L_D, W, L_S), M)

    def detach(self) -> ArrowheadPrecision:
        """The same precision with every block and factor detached from the graph."""
        cholesky = ArrowheadCholesky(*(t.detach() for t in self._cholesky))
        M = None if self._M is None else self._M.detach()
        return self._new(self._A.detach(), self._B.detach(), self._D.detach(), self._S.detach(), cholesky, M)

    # -- read-outs ----------------------------------------------------------

    @property
    def num_units(self) -> int:
        """Number of units ``N``."""
        return self._N

    @property
    def global_dim(self) -> int:
        """Global dimension ``p``."""
        return self._p

    @property
    def local_dim(self) -> int:
        """Per-unit local dimension ``k``."""
        return self._k

    @property
    def A(self) -> torch.Tensor:
        """The (repaired) global block ``A'``, ``(p, p)``."""
        return self._A

    @property
    def B(self) -> torch.Tensor:
        """The cross blocks ``B``, ``(N, k, p)``."""
        return self._B

    @property
    def D(self) -> torch.Tensor:
        """The (repaired) local blocks ``D'``, ``(N, k, k)``."""
        return self._D

    @property
    def dtype(self) -> torch.dtype:
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        return self._A.device

    @property
    def repair(self) -> SpectralRepair | Jitter | None:
        """The repair object, or ``None``."""
        return self._repair

    @property
    def report(self) -> RepairReport | None:
        """A :class:`RepairReport`, or ``None`` when no repair was asked for."""
        return self._report

    @property
    def cholesky(self) -> ArrowheadCholesky:
        """The cached :class:`ArrowheadCholesky` factor (``(y, θ)`` ordering)."""
        return self._cholesky

    @property
    def schur(self) -> torch.Tensor:
        """The (repaired) Schur complement ``S = A − Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ``, ``(p, p)``."""
        return self._S

    @property
    def M(self) -> torch.Tensor:
        """``Mᵢ = Dᵢ⁻¹ Bᵢ``, ``(N, k, p)``: the conditional mean of the units'
        offsets given ``δ_θ`` is ``−Mᵢ δ_θ`` (computed once, from the factors)."""
        if self._M is None:
            L_D, W, _ = self._cholesky
            self._M = torch.linalg.solve_triangular(L_D.mT, W, upper=True)
        return self._M

    def __repr__(self):
        repair = "" if self._repair is None else f", repair={self._repair!r}"
        return f"ArrowheadPrecision(num_units={self._N}, local_dim={self._k}, global_dim={self._p}{repair})"

    # -- linear algebra -----------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """
        The dense ``(p + N k)²`` precision in the ``(θ, y)`` ordering (tests only).

        Usage::

            ArrowheadPrecision(torch.eye(1), torch.zeros(2, 1, 1),
                               torch.ones(2, 1, 1)).to_dense()   # eye(3)
        """
        return arrowhead_to_dense(self._A, self._B, self._D)

    def log_det(self) -> torch.Tensor:
        """
        ``log det P = Σᵢ log det Dᵢ + log det S`` (a scalar).

        Usage::

            ArrowheadPrecision(2 * torch.eye(1), torch.zeros(3, 1, 1),
                               torch.eye(1).expand(3, 1, 1)).log_det()  # log 2
        """
        L_D, _, L_S = self._cholesky
        log_diag = L_D.diagonal(dim1=-2, dim2=-1).log().sum()
        return 2 * (log_diag + L_S.diagonal().log().sum())

    def matvec(self, v: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        ``P v`` for a pair ``v = (v_theta, v_y)``; see :func:`arrowhead_matvec`.

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   torch.ones(3, 1, 1))
            P.matvec((torch.ones(2), torch.ones(3, 1)))

        :return: the pair ``P v``.
        """
        return arrowhead_matvec(self._A, self._B, self._D, v)

    def solve(self, b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        ``P⁻¹ b`` for a pair ``b``, by block elimination: with ``cᵢ = Lᵢ⁻¹ b_y,i``,
        ``x_θ = S⁻¹ (b_θ − Σ Wᵢᵀ cᵢ)`` and ``x_y,i = Lᵢ⁻ᵀ (cᵢ − Wᵢ x_θ)``.

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   2 * torch.ones(3, 1, 1))
            P.solve((torch.ones(2), torch.ones(3, 1)))   # y part: 0.5

        :param tuple b: ``(b_theta, b_y)`` of shapes ``(..., p)``, ``(..., N, k)``.
        :return: the pair ``x`` with ``P x = b``.
        """
        b_theta, b_y = _check_pair(b, self._p, self._N, self._k, "b")
        L_D, W, L_S = self._cholesky
        c = _tri_solve(L_D, b_y)
        r = b_theta - torch.einsum("nkp,...nk->...p", W, c)
        x_theta = _tri_solve(L_S, _tri_solve(L_S, r), transpose=True)
        x_y = _tri_solve(L_D, c - self._w_times(x_theta), transpose=True)
        return x_theta, x_y

    def _w_times(self, v_theta):
        """``Wᵢ v_θ`` for every unit: ``(..., p) → (..., N, k)``."""
        return torch.einsum("nkp,...p->...nk", self._cholesky.W, v_theta)

    def _whiten(self, delta):
        """``Lᵀ δ`` in the ``(y, θ)`` factor: ``‖Lᵀ δ‖² = δᵀ P δ``."""
        delta_theta, delta_y = delta
        L_D, _, L_S = self._cholesky
        z_theta = _tri_matvec(L_S, delta_theta, transpose=True)
        z_y = _tri_matvec(L_D, delta_y, transpose=True) + self._w_times(delta_theta)
        return z_theta, z_y

    # -- Gaussian N(loc, P⁻¹) -----------------------------------------------

    def sample(self, eps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Reparameterised draw ``δ ~ N(0, P⁻¹)`` from a standard-normal pair
        ``eps``: ``δ_θ = L_S⁻ᵀ ε_θ``, ``δ_y,i = −Mᵢ δ_θ + Lᵢ⁻ᵀ ε_y,i``
        (that is ``δ = L⁻ᵀ ε`` with :attr:`cholesky`): a draw of the marginal
        of θ, then of each unit's conditional (:meth:`conditional_local`).
        Linear in ``eps``.

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   torch.ones(3, 1, 1))
            P.sample((torch.randn(10, 2), torch.randn(10, 3, 1)))

        :param tuple eps: ``(eps_theta, eps_y)`` of shapes ``(..., p)``, ``(..., N, k)``.
        :return: the pair ``δ``, with the broadcast batch shape of ``eps``.
        """
        eps_theta, eps_y = _check_pair(eps, self._p, self._N, self._k, "eps")
        L_D, _, L_S = self._cholesky
        delta_theta = _tri_solve(L_S, eps_theta, transpose=True)
        delta_y = self.conditional_mean(delta_theta) + _tri_solve(L_D, eps_y, transpose=True)
        return delta_theta, delta_y

    def log_prob(
        self, x: tuple[torch.Tensor, torch.Tensor], loc: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """
        Log density of ``N(loc, P⁻¹)`` at ``x``, with all constants.

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   torch.ones(3, 1, 1))
            x = (torch.zeros(4, 2), torch.zeros(4, 3, 1))
            P.log_prob(x, (torch.zeros(2), torch.zeros(3, 1)))   # shape (4,)

        :param tuple x: ``(x_theta, x_y)`` of shapes ``(..., p)``, ``(..., N, k)``.
        :param tuple loc: the mean pair (broadcast against ``x``); zero if ``None``.
        :return: shape ``broadcast(x_theta.shape[:-1], x_y.shape[:-2], ...)``.
        """
        x_theta, x_y = _check_pair(x, self._p, self._N, self._k, "x")
        if loc is not None:
            loc_theta, loc_y = _check_pair(loc, self._p, self._N, self._k, "loc")
            x_theta, x_y = x_theta - loc_theta, x_y - loc_y
        z_theta, z_y = self._whiten((x_theta, x_y))
        maha = z_theta.pow(2).sum(-1) + z_y.pow(2).sum((-2, -1))
        return -0.5 * (self._dim() * math.log(2 * math.pi) + maha) + 0.5 * self.log_det()

    def entropy(self) -> torch.Tensor:
        """
        Entropy of ``N(·, P⁻¹)``: ``½ d (1 + log 2π) − ½ log det P``.

        Usage::

            ArrowheadPrecision(torch.eye(1), torch.zeros(1, 1, 1),
                               torch.ones(1, 1, 1)).entropy()   # 1 + log 2π
        """
        return 0.5 * self._dim() * (1 + math.log(2 * math.pi)) - 0.5 * self.log_det()

    def _dim(self):
        return self._p + self._N * self._k

    def marginal_global(self) -> torch.Tensor:
        """
        Precision of the marginal of ``θ`` under ``N(·, P⁻¹)``: the Schur
        complement ``S`` (``(p, p)``).

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   torch.ones(3, 1, 1))
            torch.linalg.inv(P.marginal_global())   # covariance of θ
        """
        return self._S

    def conditional_mean(self, delta_theta: torch.Tensor) -> torch.Tensor:
        """
        Mean of the units' offsets ``δ_y`` given ``δ_θ``: ``−Mᵢ δ_θ`` per unit.

        Usage::

            P = ArrowheadPrecision(10 * torch.eye(2), torch.ones(3, 1, 2),
                                   2 * torch.ones(3, 1, 1))
            P.conditional_mean(torch.ones(5, 2)).shape   # (5, 3, 1), all -1

        :param torch.Tensor delta_theta: ``(..., p)`` offset of ``θ`` from its mean.
        :return: ``(..., N, k)``.
        """
        if delta_theta.dim() < 1 or delta_theta.shape[-1] != self._p:
            raise ValueError(
                f"delta_theta: expected shape (..., {self._p}), given {tuple(delta_theta.shape)}"
            )
        return -torch.einsum("nkp,...p->...nk", self.M, delta_theta)

    def conditional_local(self, delta_theta: torch.Tensor) -> PrecisionCholeskyNormal:
        """
        Conditional of the units' offsets ``δ_y`` given ``δ_θ``: independent
        ``N(−Mᵢ δ_θ, Dᵢ⁻¹)`` per unit, in terms of the factors ``Lᵢ`` of the ``Dᵢ``.

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   torch.ones(3, 1, 1))
            d = P.conditional_local(torch.zeros(5, 2))
            d.batch_shape, d.event_shape   # (5, 3), (1,)

        :param torch.Tensor delta_theta: ``(..., p)`` offset of ``θ`` from its mean.
        :return: a :class:`PrecisionCholeskyNormal` with ``batch_shape (..., N)``,
            ``event_shape (k,)`` and precision ``Dᵢ``.
        """
        # factors of a Cholesky decomposition: valid by construction
        return PrecisionCholeskyNormal(
            self.conditional_mean(delta_theta), self._cholesky.L_D, validate_args=False
        )

    def global_covariance(self) -> torch.Tensor:
        """
        Covariance of ``θ``, ``S⁻¹`` (``(p, p)``), from the factor of ``S``.

        Usage::

            ArrowheadPrecision(2 * torch.eye(2), torch.zeros(3, 1, 2),
                               torch.ones(3, 1, 1)).global_covariance()   # I / 2
        """
        return torch.cholesky_inverse(self._cholesky.L_S)

    def covariance_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The blocks of ``P⁻¹`` that the arrowhead structure keeps:
        ``Σ_θθ = S⁻¹``, ``Σ_yᵢθ = −Mᵢ S⁻¹`` and ``Σ_yᵢyᵢ = Dᵢ⁻¹ + Mᵢ S⁻¹ Mᵢᵀ``
        (the blocks between two units are not formed). Differentiable;
        ``O(N k² p + N k³ + p³)``.

        Usage::

            P = ArrowheadPrecision(4 * torch.eye(2), torch.ones(3, 1, 2),
                                   4 * torch.ones(3, 1, 1))
            cov_theta, cov_y_theta, cov_y = P.covariance_blocks()
            cov_y.shape   # (3, 1, 1)

        :return: ``(Σ_θθ (p, p), Σ_yθ (N, k, p), Σ_yy (N, k, k))``.
        """
        cov_theta = self.global_covariance()
        cov_y_theta = -self.M @ cov_theta
        cov_y = torch.cholesky_inverse(self._cholesky.L_D) - cov_y_theta @ self.M.mT
        return cov_theta, cov_y_theta, cov_y

    def marginal_variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Marginal variances of every coordinate, the diagonals of
        :meth:`covariance_blocks`.

        Usage::

            P = ArrowheadPrecision(torch.eye(2), torch.zeros(3, 1, 2),
                                   4 * torch.ones(3, 1, 1))
            P.marginal_variances()   # (ones(2), 0.25 * ones(3, 1))

        :return: ``(var_theta (p,), var_y (N, k))``.
        """
        cov_theta, _, cov_y = self.covariance_blocks()
        return cov_theta.diagonal(), cov_y.diagonal(dim1=-2, dim2=-1)


# ---------------------------------------------------------------------------
# the Gaussian of a precision factor


class PrecisionCholeskyNormal(TorchDistribution):
    """
    ``N(loc, (L Lᵀ)⁻¹)`` for a lower-triangular ``L`` with positive diagonal
    (``precision_tril``): a multivariate normal given the Cholesky factor of
    its precision, which it never factorises again. Draws are
    ``loc + L⁻ᵀ ε``; ``log_prob`` is ``−½ ‖Lᵀ(x − loc)‖² + Σ log Lⱼⱼ − d/2 log 2π``.
    A Pyro distribution: reparameterised, expandable under plates.

    Usage::

        L = torch.linalg.cholesky(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
        q = PrecisionCholeskyNormal(torch.zeros(2), L)
        x = q.rsample((1000,))                    # (1000, 2)
        q.log_prob(x).shape, q.entropy()          # (1000,), a scalar
        q.rsample_from_noise(torch.ones(2))       # L⁻ᵀ (1, 1)

    :param torch.Tensor loc: ``(..., d)``.
    :param torch.Tensor precision_tril: ``(..., d, d)``, batch dimensions
        broadcast against ``loc``'s (kept unbroadcast).
    """

    arg_constraints = {"loc": constraints.real_vector, "precision_tril": constraints.lower_cholesky}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, precision_tril: torch.Tensor, validate_args: bool | None = None):
        if loc.dim() < 1 or precision_tril.dim() < 2 or precision_tril.shape[-2:] != (loc.shape[-1],) * 2:
            raise ValueError(
                f"precision_tril: expected shape (..., {loc.shape[-1]}, {loc.shape[-1]}) for loc of "
                f"shape {tuple(loc.shape)}, given {tuple(precision_tril.shape)}"
            )
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], precision_tril.shape[:-2])
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self._unbroadcasted_precision_tril = precision_tril
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: PrecisionCholeskyNormal | None = None
    ) -> PrecisionCholeskyNormal:
        new = self._get_checked_instance(PrecisionCholeskyNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._unbroadcasted_precision_tril = self._unbroadcasted_precision_tril
        super(PrecisionCholeskyNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def precision_tril(self) -> torch.Tensor:
        return self._unbroadcasted_precision_tril.expand(self.batch_shape + self.event_shape * 2)

    @property
    def precision_matrix(self) -> torch.Tensor:
        L = self._unbroadcasted_precision_tril
        return (L @ L.mT).expand(self.batch_shape + self.event_shape * 2)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        cov = torch.cholesky_inverse(self._unbroadcasted_precision_tril)
        return cov.expand(self.batch_shape + self.event_shape * 2)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.covariance_matrix.diagonal(dim1=-2, dim2=-1)

    def rsample_from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """The reparameterised draw for standard-normal noise ``eps``
        (shape ``batch_shape + event_shape``, or broadcasting to it):
        ``loc + L⁻ᵀ eps``, linear in ``eps``."""
        return self.loc + _tri_solve(self._unbroadcasted_precision_tril, eps, transpose=True)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.rsample_from_noise(eps)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        L = self._unbroadcasted_precision_tril
        z = torch.einsum("...ji,...j->...i", L, value - self.loc)
        log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        d = self.event_shape[0]
        return -0.5 * (d * math.log(2 * math.pi) + z.pow(2).sum(-1)) + log_det

    def entropy(self) -> torch.Tensor:
        L = self._unbroadcasted_precision_tril
        d = self.event_shape[0]
        log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return (0.5 * d * (1 + math.log(2 * math.pi)) - log_det).expand(self.batch_shape)
