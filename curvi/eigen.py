"""Eigen-analysis of a Hessian: its stiff and sloppy directions.

For the Hessian H of a log density, H v = λ v says that along the unit
vector v the log density curves by λ: at a mode (H negative definite) the
local posterior standard deviation along v is 1 / √(−λ). Eigenvectors with
large |λ| are *stiff* combinations of the parameters, pinned down by the
data; those with λ near zero are *sloppy*, barely constrained.

Small problems get the full decomposition (``torch.linalg.eigh``). Large
ones, available only through Hessian-vector products v ↦ H v (or as a
structured :class:`~curvi.ArrowheadHessian`, multiplied without ever
forming the dense matrix), get the k extreme eigenpairs at either end by
block Lanczos: an orthonormal Krylov basis V built a block of b vectors at a
time, every new block orthogonalised twice against all of V (full
reorthogonalisation, so the projected matrix T = Vᵀ H V is exact and no
spurious copies appear), Rayleigh–Ritz on T, and thick restarts that keep
the best Ritz vectors when the basis is full. The block size b (by default
k) lets repeated eigenvalues show up with their full multiplicity, which a
single Krylov vector cannot. A Ritz pair (θ, y = V s) has residual
‖H y − θ y‖ = ‖W s_b‖, W the residual block and s_b the last b entries of
s; iteration stops when every wanted pair has residual ≤ tol · max|θ|.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .arrowhead import arrowhead_matvec
from .hessian import ArrowheadHessian
from .model import ModelView
from .tensor_ops import symmetrize

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["EigenResult", "coordinate_names", "eigen"]


class EigenResult:
    """Eigenpairs of a symmetric matrix, from :func:`eigen`.

    ``eigenvalues`` ``(m,)`` ascending, ``eigenvectors`` ``(d, m)`` (unit
    columns), ``residuals`` ``(m,)`` = ‖H v − λ v‖, ``ranks`` ``(m,)`` the
    position of each eigenvalue in the full ascending spectrum, ``dim`` d,
    ``names`` of the d coordinates (or None), ``method`` (``"dense"`` or
    ``"lanczos"``), ``converged``, ``num_matvecs`` (Hessian-vector products
    used; 0 for a dense matrix).
    """

    def __init__(
        self,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        residuals: torch.Tensor,
        ranks: torch.Tensor,
        *,
        dim: int,
        names: Sequence[str] | None = None,
        method: str = "dense",
        converged: bool = True,
        num_matvecs: int = 0,
    ):
        self.eigenvalues, self.eigenvectors, self.residuals = eigenvalues, eigenvectors, residuals
        self.ranks, self.dim, self.names = ranks, dim, names
        self.method, self.converged, self.num_matvecs = method, converged, num_matvecs

    @property
    def stiff(self) -> torch.Tensor:
        """Eigenvector of the largest |λ| found: the best-determined direction."""
        return self.eigenvectors[:, self.eigenvalues.abs().argmax()]

    @property
    def sloppy(self) -> torch.Tensor:
        """Eigenvector of the smallest |λ| found: the least-determined direction."""
        return self.eigenvectors[:, self.eigenvalues.abs().argmin()]

    def stiffness_order(self) -> torch.Tensor:
        """Indices of the eigenpairs by decreasing |λ|, stiffest first."""
        return torch.argsort(self.eigenvalues.abs(), descending=True)

    def components(
        self, index: int, top: int = 5, *, names: Sequence[str] | None = None
    ) -> list[tuple[str, float]]:
        """The ``top`` largest entries of eigenvector ``index`` as
        ``[(name, weight), ...]``, by decreasing |weight|.

        Usage::

            res = eigen(torch.diag(torch.tensor([-4.0, -1.0, -0.01])), names=["a", "b", "c"])
            res.components(0, top=1)   # [('a', ±1.0)]: the stiffest direction is a
        """
        names = self._names(names)
        v = self.eigenvectors[:, index]
        order = torch.argsort(v.abs(), descending=True)[:top]
        return [(names[i], float(v[i])) for i in order.tolist()]

    def plot(
        self,
        ax: Axes | tuple[Axes, Axes] | None = None,
        *,
        names: Sequence[str] | None = None,
        top: int = 5,
    ) -> tuple[Axes, Axes | None]:
        """Plot the spectrum and the leading components of the stiffest and
        sloppiest directions, labelled by coordinate names.

        Usage::

            import matplotlib
            matplotlib.use("Agg")
            H = -torch.diag(torch.logspace(-2, 2, 6))
            res = eigen(H, names=[f"beta[{i}]" for i in range(6)])
            spectrum_ax, components_ax = res.plot(top=3)

        :param ax: None (a new figure with two panels), a pair of matplotlib
            axes, or one axes (spectrum only, the extreme eigenvalues
            annotated with their leading components).
        :param names: coordinate names (default: those of the result, else
            ``x[i]``).
        :param int top: components shown per direction.
        :returns: the axes drawn on, ``(spectrum_ax, components_ax)``
            (``components_ax`` None for a single ``ax``).
        """
        import matplotlib.pyplot as plt

        names = self._names(names)
        if ax is None:
            _, (ax_spec, ax_comp) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
        elif hasattr(ax, "plot"):
            ax_spec, ax_comp = ax, None
        else:
            ax_spec, ax_comp = ax
        lam = self.eigenvalues.detach().cpu().double()
        ranks = self.ranks.detach().cpu()
        colours = ["tab:red" if v < 0 else "tab:blue" for v in lam.tolist()]
        ax_spec.scatter(ranks.tolist(), lam.tolist(), c=colours, s=18, zorder=3)
        nonzero = lam.abs()[lam != 0]
        if nonzero.numel() and nonzero.max() / nonzero.min() > 1e3:
            ax_spec.set_yscale("symlog", linthresh=float(nonzero.min()))
        ax_spec.axhline(0.0, color="0.6", lw=0.8)
        ax_spec.set_xlabel(f"rank in the spectrum (d = {self.dim})")
        ax_spec.set_ylabel("eigenvalue λ")
        shown = "all" if lam.numel() == self.dim else f"{lam.numel()} of {self.dim}"
        ax_spec.set_title(f"spectrum ({shown}, {self.method})")
        i_stiff, i_sloppy = int(lam.abs().argmax()), int(lam.abs().argmin())
        for i, label in ((i_stiff, "stiff"), (i_sloppy, "sloppy")):
            text = label
            if ax_comp is None:
                text += ": " + " ".join(
                    f"{w:+.2f}·{n}" for n, w in self.components(i, min(top, 3), names=names)
                )
            ax_spec.annotate(
                text, (int(ranks[i]), float(lam[i])), textcoords="offset points", xytext=(6, 6), fontsize=8
            )
        if ax_comp is not None:
            pos, ticks = 0, []
            for i, label, colour in ((i_stiff, "stiff", "tab:red"), (i_sloppy, "sloppy", "tab:green")):
                comps = self.components(i, top, names=names)
                ys = [-(pos + j) for j in range(len(comps))]
                ax_comp.barh(
                    ys, [w for _, w in comps], color=colour, label=f"{label}: λ = {float(lam[i]):.3g}"
                )
                ticks += [(y, n) for y, (n, _) in zip(ys, comps)]
                pos += len(comps) + 1
            ax_comp.set_yticks([y for y, _ in ticks], [n for _, n in ticks], fontsize=8)
            ax_comp.axvline(0.0, color="0.6", lw=0.8)
            ax_comp.set_xlabel("eigenvector component")
            ax_comp.set_title("leading components")
            ax_comp.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        return ax_spec, ax_comp

    def __repr__(self):
        head = (
            f"EigenResult({self.method}, d={self.dim}, {self.eigenvalues.numel()} eigenpairs, "
            f"converged={self.converged}, max residual {float(self.residuals.max()):.2g}"
        )
        lines = [head + ")"]
        for i in self.stiffness_order()[:6].tolist():
            comps = ", ".join(f"{w:+.2f}·{n}" for n, w in self.components(i, 3))
            lines.append(f"  λ = {float(self.eigenvalues[i]):+.4g}: {comps}")
        return "\n".join(lines)

    def _names(self, names):
        names = names if names is not None else self.names
        if names is None:
            return [f"x[{i}]" for i in range(self.dim)]
        if len(names) != self.dim:
            raise ValueError(f"names has {len(names)} entries for a dimension of {self.dim}")
        return list(names)


def eigen(
    hessian_or_hvp: torch.Tensor | ArrowheadHessian | Callable[[torch.Tensor], torch.Tensor],
    k: int | None = None,
    *,
    which: str = "both",
    dim: int | None = None,
    names: Sequence[str] | ModelView | None = None,
    method: str = "auto",
    tol: float | None = None,
    block_size: int | None = None,
    max_matvecs: int | None = None,
    batched: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """Stiff and sloppy directions of a Hessian: its extreme eigenpairs.

    Usage::

        H = -torch.diag(torch.arange(1.0, 101.0))          # d = 100
        res = eigen(H)                                      # all 100, by eigh
        res.eigenvalues[:2], res.stiff.abs().argmax()       # (-100, -99), 99

        lam = -torch.logspace(-3, 3, 5000)
        def hvp(v):                                         # only H v is available
            return lam * v
        res = eigen(hvp, k=3, dim=5000, which="smallest")   # Lanczos: the 3 stiffest
        res.eigenvalues, res.num_matvecs                    # [-1000, -997.2, -994.5], ~200

    With a :class:`~curvi.ArrowheadHessian` and a :class:`~curvi.ModelView`,
    ``eigen(H, k=5, names=view)`` labels coordinates as in
    :func:`coordinate_names`.

    :param hessian_or_hvp: a symmetric ``(d, d)`` tensor; an
        :class:`~curvi.ArrowheadHessian` (anything with arrowhead blocks
        ``A``, ``B``, ``D``), multiplied blockwise; or a callable ``v ↦ H v``
        on ``(d,)`` vectors (``(m, d)`` blocks with ``batched=True``), with
        ``dim`` given.
    :param int k: eigenpairs wanted at each requested end; None for all
        (dense only).
    :param str which: ``"both"`` (the k smallest and the k largest),
        ``"smallest"`` or ``"largest"``, algebraically. For a negative
        definite Hessian the smallest are the stiff directions, the largest
        the sloppy ones.
    :param int dim: the dimension d, required for a callable.
    :param names: d coordinate names, or a :class:`~curvi.ModelView`.
    :param str method: ``"auto"`` (dense when k is None, for a dense matrix
        of d ≤ 1024, or d ≤ 64; Lanczos otherwise), ``"dense"`` or
        ``"lanczos"``.
    :param float tol: Lanczos stops when every wanted residual
        ‖H v − λ v‖ ≤ tol · max|λ|; default 1e-10 in float64, 1e-5 otherwise.
    :param int block_size: Lanczos block size b (default k, which finds up to
        k copies of a repeated eigenvalue).
    :param int max_matvecs: budget of Hessian-vector products (default
        ``max(2000, 20 d)`` capped by the cost of ``100`` restarts); on
        running out, a ``RuntimeWarning`` and ``converged=False``.
    :param bool batched: the callable takes and returns ``(m, d)`` blocks.
    :param int seed: seed of the random starting block.
    :param dtype: dtype of the vectors for a callable (default torch's).
    :param device: device of the vectors for a callable (default torch's).
    :rtype: EigenResult
    :raises ValueError: for a non-square or non-finite matrix, a missing or
        wrong ``dim``, a bad ``k`` / ``which`` / ``method``, or ``names`` of
        the wrong length.
    :raises TypeError: for an input that is none of the three kinds.
    """
    if which not in ("both", "smallest", "largest"):
        raise ValueError(f"which must be 'both', 'smallest' or 'largest', got {which!r}")
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos', got {method!r}")
    op = _Operator(hessian_or_hvp, dim, batched, dtype, device)
    d = op.dim
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    if names is not None and not isinstance(names, (list, tuple)):
        names = coordinate_names(names, num_units=op.num_units)
    if names is not None and len(names) != d:
        raise ValueError(f"names has {len(names)} entries for a dimension of {d}")
    k_lo = 0 if which == "largest" else (d if k is None else min(k, d))
    k_hi = 0 if which == "smallest" else (d if k is None else min(k, d))
    if method == "auto":
        small = d <= (1024 if op.dense is not None else 64)
        method = "dense" if (k is None or small or k_lo + k_hi >= d) else "lanczos"
    if method == "lanczos" and k is None:
        raise ValueError("method='lanczos' needs k (the number of eigenpairs at each end)")
    if method == "dense":
        return _dense(op, k_lo, k_hi, names)
    if tol is None:
        tol = 1e-10 if op.dtype == torch.float64 else 1e-5
    return _lanczos(
        op,
        k_lo,
        k_hi,
        names=names,
        tol=tol,
        block=block_size or max(k_lo, k_hi),
        max_matvecs=max_matvecs,
        seed=seed,
    )


def coordinate_names(view: ModelView, *, num_units: int | None = None) -> list[str]:
    """Names of the flat coordinates ``[theta, y.flatten()]`` of a
    :class:`~curvi.ModelView` (the ordering of
    :meth:`~curvi.ArrowheadHessian.to_dense`): the global ones as in
    :meth:`~curvi.ModelView.global_coordinate_names`, then for unit i each
    local site ``u`` as ``u[i]`` (``u[i][j]`` when it has several coordinates
    per unit).

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView

        def model():
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", 2):
                pyro.sample("u", dist.Normal(mu, 1.0))

        coordinate_names(ModelView(model, unit_plate="groups"))   # ['mu', 'u[0]', 'u[1]']

    :param view: a :class:`~curvi.ModelView`.
    :param int num_units: number of units (default ``view.num_units``).
    """
    if not hasattr(view, "global_coordinate_names") or not hasattr(view, "local_layout"):
        raise TypeError(f"names must be a list of strings or a ModelView, got {type(view).__name__}")
    n = view.num_units if num_units is None else num_units
    names = list(view.global_coordinate_names())
    for i in range(n):
        for s in view.local_layout:
            if s.size == 1:
                names.append(f"{s.name}[{i}]")
                continue
            for idx in itertools.product(*map(range, s.shape)):
                names.append(f"{s.name}[{i}][{','.join(map(str, idx))}]")
    return names


# ------------------------------------------------------------------ operator
class _Operator:
    """The three input kinds behind one interface: ``matmat(V)`` for a
    ``(d, m)`` block, ``dense`` (the matrix, or None), ``dim``, ``dtype``,
    ``device``."""

    def __init__(self, obj, dim, batched, dtype, device):
        self.num_units = None
        self.dense = None
        if isinstance(obj, torch.Tensor):
            if obj.dim() != 2 or obj.shape[0] != obj.shape[1]:
                raise ValueError(f"a Hessian tensor must be square (d, d), got shape {tuple(obj.shape)}")
            if not obj.dtype.is_floating_point:
                raise TypeError(f"the Hessian must be a floating-point tensor, got dtype {obj.dtype}")
            if not torch.isfinite(obj).all():
                raise ValueError("the Hessian has non-finite entries")
            self.dense = symmetrize(obj).detach()
            self.dim, self.dtype, self.device = obj.shape[0], obj.dtype, obj.device
            self.matmat = lambda V: self.dense @ V
        elif all(hasattr(obj, a) for a in ("A", "B", "D")):
            A, B, D = obj.A.detach(), obj.B.detach(), obj.D.detach()
            p, (N, kk) = A.shape[0], D.shape[:2]
            self.dim, self.dtype, self.device, self.num_units = p + N * kk, A.dtype, A.device, N
            self._to_dense = getattr(obj, "to_dense", None)

            def matmat(V):
                vt, vy = V[:p].T, V[p:].T.reshape(V.shape[1], N, kk)
                ot, oy = arrowhead_matvec(A, B, D, (vt, vy))
                return torch.cat([ot, oy.reshape(V.shape[1], N * kk)], dim=-1).T

            self.matmat = matmat
        elif callable(obj):
            if dim is None or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"a Hessian-vector product needs dim=d (a positive integer), got {dim!r}")
            self.dim = dim
            self.dtype = dtype or torch.get_default_dtype()
            self.device = torch.device(device) if device is not None else torch.get_default_device()

            def matmat(V):
                if batched:
                    out = obj(V.T)
                    return _checked(out, (V.shape[1], dim)).T
                return torch.stack([_checked(obj(v), (dim,)) for v in V.T], dim=1)

            self.matmat = matmat
        else:
            raise TypeError(
                "eigen() takes a (d, d) tensor, an ArrowheadHessian or a callable v -> H v, "
                f"got {type(obj).__name__}"
            )
        if dim is not None and dim != self.dim:
            raise ValueError(f"dim={dim} does not match the Hessian's dimension {self.dim}")

    def to_dense(self):
        if self.dense is not None:
            return self.dense
        if getattr(self, "_to_dense", None) is not None:
            return self._to_dense().detach()
        M = self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))
        return symmetrize(M)


def _checked(out, shape):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the Hessian-vector product returned {got}, expected shape {shape}")
    return out.detach()


# --------------------------------------------------------------------- dense
def _dense(op, k_lo, k_hi, names):
    H = op.to_dense()
    lam, Q = torch.linalg.eigh(H)
    d = op.dim
    idx = sorted(set(range(k_lo)) | set(range(d - k_hi, d)))
    idx_t = torch.tensor(idx, device=lam.device)
    lam, Q = lam[idx_t], Q[:, idx_t]
    residuals = torch.linalg.vector_norm(H @ Q - Q * lam, dim=0)
    return EigenResult(
        lam,
        Q,
        residuals,
        idx_t.cpu(),
        dim=d,
        names=names,
        method="dense",
        num_matvecs=0 if op.dense is not None else d,
    )


# ------------------------------------------------------------------- Lanczos
def _lanczos(op, k_lo, k_hi, *, names, tol, block, max_matvecs, seed):
    d, dtype, device = op.dim, op.dtype, op.device
    b = max(1, min(block, d))
    wanted = k_lo + k_hi
    m_max = min(d, max(3 * wanted + 3 * b, 4 * b, 50))
    keep_max = max(wanted, min(m_max - 2 * b, 2 * wanted))
    if max_matvecs is None:
        max_matvecs = max(2000, 20 * d)
    gen = torch.Generator(device=device).manual_seed(seed)

    V = torch.empty(d, 0, dtype=dtype, device=device)
    T = torch.empty(0, 0, dtype=dtype, device=device)
    Q = _orthonormal_block(torch.randn(d, b, generator=gen, dtype=dtype, device=device), V, gen)
    matvecs, converged = 0, False
    while True:
        W = None
        while V.shape[1] + Q.shape[1] <= m_max and Q.shape[1] > 0:
            W = op.matmat(Q)
            matvecs += Q.shape[1]
            Vn = torch.cat([V, Q], dim=1)
            h = Vn.T @ W
            W = W - Vn @ h
            h2 = Vn.T @ W  # second pass: full reorthogonalisation
            W = W - Vn @ h2
            h = h + h2
            j = V.shape[1]
            Tn = torch.zeros(j + Q.shape[1], j + Q.shape[1], dtype=dtype, device=device)
            Tn[:j, :j] = T
            Tn[:, j:] = h
            Tn[j:, :j] = h[:j].T
            Tn[j:, j:] = symmetrize(h[j:])
            V, T, last = Vn, Tn, Q.shape[1]
            if V.shape[1] >= d:
                Q = V.new_zeros(d, 0)
                break
            Q = _orthonormal_block(W, V, gen, width=min(b, d - V.shape[1]))
        theta, S = torch.linalg.eigh(T)
        m = theta.numel()
        resid = (
            torch.linalg.vector_norm(W @ S[m - last :], dim=0)
            if W is not None and V.shape[1] < d
            else theta.new_zeros(m)
        )
        want = list(range(min(k_lo, m))) + list(range(max(m - k_hi, min(k_lo, m)), m))
        scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
        converged = bool((resid[want] <= tol * scale).all())
        if converged or V.shape[1] >= d or matvecs >= max_matvecs:
            break
        # thick restart: keep the best Ritz vectors at the wanted ends
        extra = keep_max - wanted
        lo = min(m, k_lo + (extra // 2 if k_lo and k_hi else (extra if k_lo else 0)))
        hi = min(m - lo, k_hi + (extra - extra // 2 if k_lo and k_hi else (extra if k_hi else 0)))
        keep = list(range(lo)) + list(range(m - hi, m))
        V = V @ S[:, keep]
        T = torch.diag(theta[keep])
        # the next block Q (orthogonal to the old basis) continues the Krylov space
    lam, Y = theta[want], V @ S[:, want]
    res = resid[want]
    ranks = torch.tensor(list(range(min(k_lo, m))) + list(range(d - (len(want) - min(k_lo, m)), d)))
    if not converged:
        warnings.warn(
            f"Lanczos did not converge within {matvecs} Hessian-vector products: largest relative "
            f"residual {float(res.max() / scale):.2g} > tol={tol:g}; raise max_matvecs or tol",
            RuntimeWarning,
            stacklevel=3,
        )
    return EigenResult(
        lam, Y, res, ranks, dim=d, names=names, method="lanczos", converged=converged, num_matvecs=matvecs
    )


def _orthonormal_block(W, V, gen, width=None):
    """An orthonormal basis of the columns of W made orthogonal to V; columns
    that vanish (the Krylov space is invariant there) are replaced by random
    directions orthogonal to V, so that the basis keeps growing."""
    width = W.shape[1] if width is None else width
    d = W.shape[0]
    eps = torch.finfo(W.dtype).eps
    scale = torch.linalg.vector_norm(W, dim=0).max().clamp_min(torch.finfo(W.dtype).tiny)
    Q, R = torch.linalg.qr(W)
    ok = R.diagonal().abs() > math.sqrt(d) * 100 * eps * scale
    Q = Q[:, ok][:, :width]
    while Q.shape[1] < width:
        Z = torch.randn(d, width - Q.shape[1], generator=gen, dtype=W.dtype, device=W.device)
        basis = torch.cat([V, Q], dim=1)
        for _ in range(2):
            Z = Z - basis @ (basis.T @ Z)
        Z, _ = torch.linalg.qr(Z)
        Q = torch.cat([Q, Z], dim=1)
    for _ in range(2):  # guard against loss of orthogonality to V
        Q = Q - V @ (V.T @ Q)
    Q, _ = torch.linalg.qr(Q)
    return Q
