"""
Differentiable positive-definite repair of batched symmetric matrices.

A *spectral* repair maps every eigenvalue ``λ`` of a symmetric matrix
``M = Q diag(λ) Qᵀ`` through a positive function ``f`` and returns
``Q diag(f(λ)) Qᵀ``. Its derivative is the Daleckii–Krein (Fréchet)
derivative, implemented so that it stays exact and finite for repeated
eigenvalues, where the backward of :func:`torch.linalg.eigh` divides by
``λᵢ − λⱼ``. :class:`Jitter` instead shifts the whole spectrum.

All repairs act blockwise over leading batch dimensions ``(..., n, n)``
and return a :class:`RepairResult`. Use :func:`as_repair` to turn a
user-facing option (``None`` or a name) into a repair object.

**References**

[1] Yu. L. Daleckii, S. G. Krein (1965), "Integration and differentiation of
    functions of Hermitian operators and applications to the theory of
    perturbations".
[2] M. Betancourt (2013), "A General Metric for Riemannian Manifold
    Hamiltonian Monte Carlo" (the SoftAbs map).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .tensor_ops import symmetrize

__all__ = [
    "RepairResult",
    "SpectralRepair",
    "SoftAbs",
    "SoftplusFloor",
    "Clip",
    "Jitter",
    "spectral_map",
    "as_repair",
    "REPAIR_NAMES",
]


class RepairResult(NamedTuple):
    """
    Output of a repair.

    :ivar torch.Tensor matrix: the repaired matrices, shape ``(..., n, n)``;
        differentiable with respect to the input.
    :ivar torch.Tensor eigvals_before: eigenvalues of the input, ascending,
        shape ``(..., n)`` (detached; for diagnostics).
    :ivar torch.Tensor eigvals_after: the corresponding eigenvalues of the
        repaired matrices, shape ``(..., n)`` (detached).
    """

    matrix: torch.Tensor
    eigvals_before: torch.Tensor
    eigvals_after: torch.Tensor


def _divided_differences(lam, f_lam, df, rtol):
    """
    The Daleckii–Krein matrix ``F_ij = (f(λᵢ) − f(λⱼ)) / (λᵢ − λⱼ)``, with
    ``f'((λᵢ + λⱼ) / 2)`` where ``|λᵢ − λⱼ| ≤ rtol · max|λ|`` (cancellation
    would otherwise ruin the quotient).
    """
    diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    scale = lam.abs().amax(-1, keepdim=True).unsqueeze(-1)
    scale = scale.clamp(min=torch.finfo(lam.dtype).tiny)
    close = diff.abs() <= rtol * scale
    quotient = (f_lam.unsqueeze(-1) - f_lam.unsqueeze(-2)) / torch.where(close, torch.ones_like(diff), diff)
    midpoint = 0.5 * (lam.unsqueeze(-1) + lam.unsqueeze(-2))
    return torch.where(close, df(midpoint), quotient)


def spectral_map(
    M: torch.Tensor,
    f: Callable[[torch.Tensor], torch.Tensor],
    df: Callable[[torch.Tensor], torch.Tensor],
    *,
    rtol: float | None = None,
) -> RepairResult:
    """
    Apply ``f`` to the eigenvalues of the symmetric matrices ``M`` with an
    exact first derivative, also at repeated eigenvalues.

    With ``M₀ = M.detach() = Q diag(λ) Qᵀ`` this returns::

        Q f(Λ) Qᵀ + Q (F ∘ (Qᵀ (M − M₀) Q)) Qᵀ

    whose value is ``Q f(Λ) Qᵀ`` and whose derivative with respect to ``M``
    is the Fréchet derivative of the matrix function (Daleckii–Krein).
    Only differentiable torch operations touch ``M``, so ``M`` may carry
    autograd history (e.g. a Hessian built with ``create_graph=True``).
    Second derivatives through the map are not provided.

    Usage::

        M = torch.eye(3, dtype=torch.float64).requires_grad_()
        out = spectral_map(M, torch.exp, torch.exp)
        out.matrix.trace().backward()   # M.grad == e · I, no NaN

    :param torch.Tensor M: symmetric matrices, shape ``(..., n, n)``.
    :param callable f: the spectral map, elementwise on a tensor.
    :param callable df: its derivative ``f'``, elementwise.
    :param float rtol: eigenvalues closer than ``rtol · max|λ|`` are treated
        as equal; default ``eps ** (1/3)`` of ``M``'s dtype, which balances
        rounding in the divided difference against the midpoint rule.
    :return: the mapped matrices and the eigenvalues before and after.
    :rtype: RepairResult
    """
    if rtol is None:
        rtol = torch.finfo(M.dtype).eps ** (1.0 / 3.0)
    M0 = M.detach()
    lam, Q = torch.linalg.eigh(M0)
    f_lam = f(lam)
    if M.shape[-1] == 0:
        return RepairResult(M, lam, f_lam)
    F_dk = _divided_differences(lam, f_lam, df, rtol)
    inner = torch.diag_embed(f_lam) + F_dk * (Q.mT @ (M - M0) @ Q)
    return RepairResult(symmetrize(Q @ inner @ Q.mT), lam, f_lam)


class SpectralRepair:
    """
    Base class of repairs that map each eigenvalue through ``f``.

    Subclasses define the elementwise map :meth:`f` and its derivative
    :meth:`df`; calling the object applies :func:`spectral_map`.

    Usage::

        class Exp(SpectralRepair):
            def f(self, lam):
                return lam.exp()
            def df(self, lam):
                return lam.exp()
        Exp()(torch.zeros(2, 2)).matrix   # the identity
    """

    def f(self, lam: torch.Tensor) -> torch.Tensor:
        """The positive spectral map ``f(λ)``, elementwise."""
        raise NotImplementedError

    def df(self, lam: torch.Tensor) -> torch.Tensor:
        """Its derivative ``f'(λ)``, elementwise."""
        raise NotImplementedError

    def __call__(self, M: torch.Tensor) -> RepairResult:
        """
        Repair the symmetric matrices ``M`` of shape ``(..., n, n)``.

        :rtype: RepairResult
        """
        return spectral_map(M, self.f, self.df)


# Taylor coefficients of x·coth(x) = Σ c_n x^(2n) (c_n = 4ⁿ B_2n / (2n)!).
_XCOTHX = (1.0, 1.0 / 3.0, -1.0 / 45.0, 2.0 / 945.0, -1.0 / 4725.0, 2.0 / 93555.0)
_SERIES_CUTOFF = 0.1  # |x| below which the series is used (error < 1e-14)


def _xcothx(x):
    small = x.abs() < _SERIES_CUTOFF
    x_safe = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    series = sum(c * x2**n for n, c in enumerate(_XCOTHX))
    return torch.where(small, series, x_safe / torch.tanh(x_safe))


def _xcothx_derivative(x):
    small = x.abs() < _SERIES_CUTOFF
    x_safe = torch.where(small, torch.ones_like(x), x)
    series = sum(2 * n * c * x ** (2 * n - 1) for n, c in enumerate(_XCOTHX) if n)
    direct = 1.0 / torch.tanh(x_safe) - x_safe / torch.sinh(x_safe) ** 2
    return torch.where(small, series, direct)


class SoftAbs(SpectralRepair):
    """
    SoftAbs repair ``f(λ) = λ · coth(α λ)``: a smooth ``|λ|`` bounded below by
    ``f(0) = 1/α``. Negative curvature directions become positive ones of the
    same magnitude; eigenvalues with ``|λ| ≫ 1/α`` are kept (in absolute
    value). A series is used near ``λ = 0`` so ``f`` and ``f'`` are accurate
    there.

    Usage::

        M = torch.tensor([[1.0, 2.0], [2.0, 1.0]])   # eigenvalues -1, 3
        SoftAbs(alpha=1e3)(M).eigvals_after          # ≈ tensor([1., 3.])

    :param float alpha: sharpness ``α > 0``; the smallest eigenvalue after
        repair is ``1/α``.

    **References**

    [1] M. Betancourt (2013), "A General Metric for Riemannian Manifold
        Hamiltonian Monte Carlo", arXiv:1212.4693.
    """

    def __init__(self, alpha: float = 1e3):
        if not alpha > 0:
            raise ValueError(f"SoftAbs: expected alpha > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def f(self, lam: torch.Tensor) -> torch.Tensor:
        return _xcothx(self.alpha * lam) / self.alpha

    def df(self, lam: torch.Tensor) -> torch.Tensor:
        return _xcothx_derivative(self.alpha * lam)

    def __repr__(self):
        return f"SoftAbs(alpha={self.alpha:g})"


class SoftplusFloor(SpectralRepair):
    """
    Softplus floor ``f(λ) = floor + floor · softplus((λ − floor) / floor)``:
    smooth, increasing, ``f(λ) > floor``, and ``f(λ) ≈ λ`` for ``λ ≫ floor``.
    Unlike :class:`SoftAbs` it sends negative curvature to (about) ``floor``
    rather than to its magnitude.

    Usage::

        M = torch.diag(torch.tensor([-1.0, 5.0]))
        SoftplusFloor(floor=1e-3)(M).eigvals_after   # ≈ tensor([1e-3, 5.])

    :param float floor: the lower bound ``> 0`` on the repaired eigenvalues.
    """

    def __init__(self, floor: float = 1e-3):
        if not floor > 0:
            raise ValueError(f"SoftplusFloor: expected floor > 0, got {floor!r}")
        self.floor = float(floor)

    def f(self, lam: torch.Tensor) -> torch.Tensor:
        return self.floor + self.floor * F.softplus((lam - self.floor) / self.floor)

    def df(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((lam - self.floor) / self.floor)

    def __repr__(self):
        return f"SoftplusFloor(floor={self.floor:g})"


class Clip(SpectralRepair):
    """
    Hard clipping ``f(λ) = max(λ, floor)``. Not differentiable where an
    eigenvalue equals ``floor``; elsewhere its derivative is exact.

    Usage::

        M = torch.diag(torch.tensor([-1.0, 5.0]))
        Clip(floor=1e-3)(M).eigvals_after   # tensor([1e-3, 5.])

    :param float floor: the lower bound ``> 0`` on the repaired eigenvalues.
    """

    def __init__(self, floor: float = 1e-3):
        if not floor > 0:
            raise ValueError(f"Clip: expected floor > 0, got {floor!r}")
        self.floor = float(floor)

    def f(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.clamp(min=self.floor)

    def df(self, lam: torch.Tensor) -> torch.Tensor:
        return (lam > self.floor).to(lam.dtype)

    def __repr__(self):
        return f"Clip(floor={self.floor:g})"


class Jitter:
    """
    Diagonal jitter ``M + relu(floor − λ_min(M)) · I``: the smallest shift of
    the whole spectrum that makes the smallest eigenvalue at least ``floor``
    (no shift for matrices that already satisfy it). ``λ_min`` comes from
    :func:`torch.linalg.eigvalsh`, whose backward is stable.

    Usage::

        M = torch.diag(torch.tensor([-1.0, 5.0]))
        Jitter(floor=1e-3)(M).eigvals_after   # tensor([1e-3, 6.001])

    :param float floor: the lower bound ``> 0`` on the repaired eigenvalues.
    """

    def __init__(self, floor: float = 1e-3):
        if not floor > 0:
            raise ValueError(f"Jitter: expected floor > 0, got {floor!r}")
        self.floor = float(floor)

    def __call__(self, M: torch.Tensor) -> RepairResult:
        """
        Repair the symmetric matrices ``M`` of shape ``(..., n, n)``.

        :rtype: RepairResult
        """
        n = M.shape[-1]
        lam = torch.linalg.eigvalsh(M)
        if n == 0:
            return RepairResult(M, lam.detach(), lam.detach())
        shift = torch.relu(self.floor - lam[..., 0])
        eye = torch.eye(n, dtype=M.dtype, device=M.device)
        repaired = M + shift[..., None, None] * eye
        after = (lam + shift.unsqueeze(-1)).detach()
        return RepairResult(repaired, lam.detach(), after)

    def __repr__(self):
        return f"Jitter(floor={self.floor:g})"


REPAIR_NAMES = {
    "softabs": SoftAbs,
    "softplus": SoftplusFloor,
    "clip": Clip,
    "jitter": Jitter,
}


def as_repair(spec: SpectralRepair | Jitter | str | None) -> SpectralRepair | Jitter | None:
    """
    Turn a user-facing repair option into a repair object.

    Usage::

        as_repair("softabs")         # SoftAbs(alpha=1000)
        as_repair(Clip(floor=0.1))   # passed through
        as_repair(None)              # None: no repair

    :param spec: ``None``, one of ``"softabs"``, ``"softplus"``, ``"clip"``,
        ``"jitter"`` (default parameters), or a repair instance
        (:class:`SpectralRepair` or :class:`Jitter`).
    :return: the repair object, or ``None``.
    :raises ValueError: for any other value.
    """
    if spec is None or isinstance(spec, (SpectralRepair, Jitter)):
        return spec
    if isinstance(spec, str) and spec.lower() in REPAIR_NAMES:
        return REPAIR_NAMES[spec.lower()]()
    accepted = ", ".join(repr(name) for name in REPAIR_NAMES)
    raise ValueError(
        f"unknown repair {spec!r}: expected None, one of {accepted}, "
        "or an instance of SoftAbs, SoftplusFloor, Clip or Jitter"
    )
