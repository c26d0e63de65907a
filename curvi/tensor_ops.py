"""Small tensor helpers shared by curvi's modules, one home each.

Usage::

    import torch
    from curvi.tensor_ops import grad, hessian_rows, rng_state, set_rng_state, symmetrize

    M = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    symmetrize(M)                       # [[1, 1], [1, 1]]
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (g,) = grad((x**2).sum(), x)        # 2x
    (z,) = grad(x.sum() * 0, [torch.zeros(1, requires_grad=True)])  # unused: zeros
    state = rng_state()
    a = torch.rand(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(2), a)
    (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
    hessian_rows(g, x, torch.eye(2))    # diag(6x)
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.util
import torch

__all__ = ["grad", "hessian_rows", "rng_state", "set_rng_state", "symmetrize"]


def symmetrize(M: torch.Tensor) -> torch.Tensor:
    """``(M + Mᵀ) / 2`` over the last two dimensions (batched)."""
    return 0.5 * (M + M.transpose(-1, -2))


def grad(
    out: torch.Tensor,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, ...]:
    """:func:`torch.autograd.grad` with zeros for inputs ``out`` does not
    depend on (``allow_unused``, ``materialize_grads``); other keywords
    (``create_graph``, ``retain_graph``, ``is_grads_batched``) pass through."""
    return torch.autograd.grad(out, inputs, grad_outputs, allow_unused=True, materialize_grads=True, **kwargs)


def hessian_rows(
    grads: torch.Tensor, x: torch.Tensor, directions: torch.Tensor, *, retain_graph: bool = False
) -> torch.Tensor:
    """Hessian-vector products by double backward: for ``grads``, a gradient
    of a scalar with respect to ``x`` computed with ``create_graph=True``,
    the products with each of ``directions`` (stacked on a leading axis) in
    one batched backward pass; one pass per direction when an operation of
    the model has no batching rule (an out-of-memory error is not retried)."""
    try:
        (rows,) = torch.autograd.grad(grads, x, directions, is_grads_batched=True, retain_graph=retain_graph)
        return rows
    except RuntimeError as error:  # an op without a batching rule: one row at a time
        if isinstance(error, torch.OutOfMemoryError):
            raise
    last = len(directions) - 1
    return torch.stack(
        [
            torch.autograd.grad(grads, x, e, retain_graph=retain_graph or i < last)[0]
            for i, e in enumerate(directions)
        ]
    )


def rng_state() -> dict:
    """Python's, NumPy's and torch's random states (and CUDA's, when in use):
    everything a draw depends on, for a bitwise restart."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    pyro.util.set_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
