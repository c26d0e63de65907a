"""Kronecker-factored curvature (K-FAC) blocks for the layers of a network.

For a layer ``s = W a`` (bias folded in as a last column of ``W`` and a
constant 1 appended to ``a``) the block of a Gauss–Newton matrix
``Σ_n J_nᵀ H_n J_n`` that belongs to ``vec(W)`` is, for one row (one datum,
one spatial position), *exactly* ``a aᵀ ⊗ E_v[g gᵀ]`` with ``g = (∂out/∂s)ᵀ v``
the vector backpropagated from an output vector ``v`` with ``E[v vᵀ] = H``.
Over many rows K-FAC approximates the sum of these Kronecker products by
one Kronecker product (Martens & Grosse, 2015)::

    Σ_n a_n a_nᵀ ⊗ g_n g_nᵀ  ≈  A ⊗ G,   A = mean_n a_n a_nᵀ,   G = Σ_n g_n g_nᵀ,

exact when every ``g_n g_nᵀ`` is the same matrix (say, a linear network
with constant H) or every ``a_n`` is, and an approximation otherwise (it
drops the correlation between a layer's inputs and its output gradients).
Blocks of different layers are treated as independent (the matrix is
approximated block diagonal). ``A`` is a mean and ``G`` a sum so that
``A ⊗ G`` carries the scale of a loss that *sums* over data, as Pyro's
ELBOs do.

A 2-d convolution is a linear layer on the patches of its input
(``torch.nn.functional.unfold``), one row per image and output position
(Grosse & Martens, 2016, with spatially uncorrelated derivatives). A masked
linear layer (Pyro's :class:`~pyro.nn.auto_reg_nn.MaskedLinear`, used by
its autoregressive flows, whose weight enters as ``W * mask``) gets the
K-FAC block of its full weight, and its preconditioned update is multiplied
by the mask, so that the masked-out weights never move.

The damped inverse is applied through the eigendecompositions
``A = Q_A diag(e_A) Q_Aᵀ``, ``G = Q_G diag(e_G) Q_Gᵀ``::

    (A ⊗ G + λ I)⁻¹ vec(V) = vec( Q_G [ (Q_Gᵀ V Q_A) / (e_G e_Aᵀ + λ) ] Q_Aᵀ ),

the exact inverse of the damped Kronecker product (not the factored
π-damping approximation of it). ``λ`` is ``damping`` times the mean
eigenvalue of ``A ⊗ G``, so ``damping`` is dimensionless.

:class:`KroneckerLayer` holds one layer's factors; :class:`LayerRecorder`
finds the supported layers a function calls and records their inputs and
outputs; :func:`input_factor` and :func:`output_factor` are the estimates.

**References**

1. J. Martens, R. Grosse, *Optimizing Neural Networks with
   Kronecker-factored Approximate Curvature*, ICML 2015.
2. R. Grosse, J. Martens, *A Kronecker-factored approximate Fisher matrix
   for convolution layers*, ICML 2016.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_ops import symmetrize

__all__ = ["KroneckerLayer", "LayerRecorder", "input_factor", "is_supported", "output_factor"]


def is_supported(module: nn.Module) -> bool:
    """Whether K-FAC handles ``module``: an ``nn.Linear`` (masked ones
    included: any ``nn.Linear`` with a ``mask`` buffer of the weight's shape,
    such as Pyro's ``MaskedLinear``) or an ``nn.Conv2d`` with ``groups=1``
    and zero padding."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return False


def input_factor(rows: torch.Tensor) -> torch.Tensor:
    """``A = mean_n a_n a_nᵀ`` from layer inputs ``rows`` ``(n, d_in)``."""
    return symmetrize(rows.T @ rows / rows.shape[0])


def output_factor(rows: torch.Tensor) -> torch.Tensor:
    """``G = Σ_n g_n g_nᵀ`` from backpropagated output vectors ``rows`` ``(n, d_out)``."""
    return symmetrize(rows.T @ rows)


class KroneckerLayer:
    """The K-FAC block of one layer: running factors, their
    eigendecompositions, and the preconditioned update.

    Usage::

        from torch import nn
        from curvi.kfac import KroneckerLayer, input_factor, output_factor

        layer = nn.Linear(3, 2)
        block = KroneckerLayer(layer)
        a, g = torch.randn(5, 3), torch.randn(5, 2)   # inputs, backpropagated vectors
        block.update_factors(input_factor(block.input_rows(a)), output_factor(g), decay=0.95)
        block.update_inverse()
        V = torch.randn(2, 4)                         # [∇W, ∇b] as one matrix
        U = block.precondition(V, damping=1e-3)       # ≈ (A ⊗ G + λ I)⁻¹ V

    :param module: an ``nn.Linear`` or ``nn.Conv2d`` (see :func:`is_supported`).
    :raises ValueError: for a module K-FAC does not handle.
    """

    def __init__(self, module: nn.Module) -> None:
        if not is_supported(module):
            raise ValueError(
                f"module must be an nn.Linear or an nn.Conv2d with groups=1 and zero padding, got {module!r}"
            )
        self.module = module
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        mask = getattr(module, "mask", None)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.shape == module.weight.shape else None
        self.has_bias = module.bias is not None
        #: the running input factor A, ``(d_in [+1], d_in [+1])``; ``None`` before the first update
        self.A: torch.Tensor | None = None
        #: the running output factor G, ``(d_out, d_out)``
        self.G: torch.Tensor | None = None
        self._eig: tuple[torch.Tensor, ...] | None = None  # (e_A, Q_A, e_G, Q_G)

    @property
    def has_inverse(self) -> bool:
        """Whether :meth:`update_inverse` has run (so :meth:`precondition` can)."""
        return self._eig is not None

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The weight, and the bias if there is one."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    # ------------------------------------------------------------ rows
    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """The rows ``a_n`` (with a trailing 1 when the layer has a bias) of
        one call's input: one per leading index (linear) or per image and
        output position (conv2d)."""
        if self.kind == "conv2d":
            m = self.module
            patches = F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = inputs.reshape(-1, inputs.shape[-1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """The rows ``g_n`` of a vector backpropagated to one call's output."""
        if self.kind == "conv2d":
            return grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])
        return grad_output.reshape(-1, grad_output.shape[-1])

    def gradient_matrix(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """``[∇W ∇b]`` as one ``(d_out, d_in [+1])`` matrix, from the
        gradients of :attr:`parameters` (``None`` read as zero)."""
        weight = self.module.weight
        gw = grads[0] if grads[0] is not None else torch.zeros_like(weight)
        matrix = gw.reshape(weight.shape[0], -1)
        if self.has_bias:
            gb = grads[1] if grads[1] is not None else torch.zeros_like(self.module.bias)
            matrix = torch.cat([matrix, gb.unsqueeze(1)], dim=1)
        return matrix

    def split(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`gradient_matrix`: tensors shaped as :attr:`parameters`."""
        weight = self.module.weight
        if self.has_bias:
            return [matrix[:, :-1].reshape(weight.shape), matrix[:, -1].reshape(self.module.bias.shape)]
        return [matrix.reshape(weight.shape)]

    # ------------------------------------------------------------ factors
    def update_factors(self, A: torch.Tensor, G: torch.Tensor, *, decay: float) -> None:
        """Running averages ``A ← decay A + (1 − decay) A_new`` (the same for
        G); the first update sets them."""
        if self.A is None:
            self.A, self.G = A.detach().clone(), G.detach().clone()
        else:
            self.A.mul_(decay).add_(A.detach(), alpha=1 - decay)
            self.G.mul_(decay).add_(G.detach(), alpha=1 - decay)

    def update_inverse(self) -> None:
        """Eigendecompose the current factors (what :meth:`precondition` uses)."""
        if self.A is None:
            raise RuntimeError("update_factors must run before update_inverse")
        e_A, Q_A = torch.linalg.eigh(symmetrize(self.A))
        e_G, Q_G = torch.linalg.eigh(symmetrize(self.G))
        self._eig = (e_A.clamp_min(0), Q_A, e_G.clamp_min(0), Q_G)

    def precondition(self, V: torch.Tensor, *, damping: float) -> torch.Tensor:
        """``(A ⊗ G + λ I)⁻¹ V`` for the gradient matrix ``V`` (``λ`` =
        ``damping`` times the mean eigenvalue of ``A ⊗ G``), multiplied by the
        layer's mask if it has one."""
        if self._eig is None:
            raise RuntimeError("update_inverse must run before precondition")
        e_A, Q_A, e_G, Q_G = self._eig
        scale = torch.outer(e_G, e_A)
        lam = damping * e_A.mean() * e_G.mean()
        denominator = scale + lam
        floor = torch.finfo(V.dtype).eps * denominator.max().clamp_min(torch.finfo(V.dtype).tiny)
        U = Q_G @ ((Q_G.T @ V @ Q_A) / denominator.clamp_min(floor)) @ Q_A.T
        return self.masked(U)

    def masked(self, U: torch.Tensor) -> torch.Tensor:
        """``U`` with the weight columns multiplied by the layer's mask (the
        bias column untouched); ``U`` itself for an unmasked layer."""
        if self.mask is None:
            return U
        mask = self.mask.reshape(self.mask.shape[0], -1).to(U.dtype)
        if self.has_bias:
            return torch.cat([U[:, :-1] * mask, U[:, -1:]], dim=1)
        return U * mask

    # ------------------------------------------------------------ state
    def get_state(self) -> dict:
        """The factors and eigendecompositions, cloned (for checkpoints)."""
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        eig = None if self._eig is None else tuple(clone(t) for t in self._eig)
        return {"A": clone(self.A), "G": clone(self.G), "eig": eig}

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned."""
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        self.A, self.G = clone(state["A"]), clone(state["G"])
        self._eig = None if state["eig"] is None else tuple(clone(t) for t in state["eig"])


class LayerRecorder:
    """Records the calls of supported layers made while it is active.

    A global forward hook (``torch.nn.modules.module.register_module_forward_hook``)
    sees every module called, so layers are found inside Pyro's flows and
    behind ``pyro.module`` without the caller naming them (the caller keeps
    the layers whose weights it trains). ``calls[module]`` lists
    ``(input, output)`` pairs of the calls whose output requires grad: the
    input detached, the output with its autograd graph (to backpropagate
    vectors to it).
    """

    def __init__(self) -> None:
        self.calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handle = None

    def __enter__(self) -> LayerRecorder:
        self.calls = {}
        self._handle = nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None

    def _hook(self, module, inputs, output):
        if not is_supported(module):
            return
        if not (isinstance(output, torch.Tensor) and output.requires_grad and len(inputs) == 1):
            return
        self.calls.setdefault(module, []).append((inputs[0].detach(), output))
