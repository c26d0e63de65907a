"""The sparse factorisation (issue 15, item 2): log-determinant, solves,
draws and their gradients against dense references in float64."""

import numpy as np
import pytest
import torch

from curvi.modes import NoLaplaceApproximation
from curvi.sparse_cholesky import SparsePattern, sparse_inverse_subset, sparse_logdet, sparse_solve


def random_spd(n, density, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, n, generator=g) < density
    mask = mask | mask.T | torch.eye(n, dtype=torch.bool)
    A = (M @ M.T) * mask + n * torch.eye(n, dtype=torch.float64)
    rows, cols = torch.nonzero(torch.tril(mask), as_tuple=True)
    return SparsePattern(n, rows, cols), A[rows, cols], A


def tree_spd(num_leaves_per_node, seed):
    """A three-level tree (root, 6 mid nodes, leaves under each): nested factors."""
    g = torch.Generator().manual_seed(seed)
    parent = [-1] + [0] * 6 + [1 + i // num_leaves_per_node for i in range(6 * num_leaves_per_node)]
    n = len(parent)
    A = torch.zeros(n, n, dtype=torch.float64)
    for child, p in enumerate(parent):
        if p >= 0:
            w = torch.randn((), generator=g, dtype=torch.float64)
            A[child, p] = A[p, child] = w
    A = A + torch.diag(A.abs().sum(1) + 1.0)
    rows, cols = torch.nonzero(torch.tril(A != 0), as_tuple=True)
    return SparsePattern(n, rows, cols), A[rows, cols], A


CASES = [
    ("sparse", lambda: random_spd(60, 0.08, 0)),
    ("dense", lambda: random_spd(30, 1.0, 1)),
    ("tree", lambda: tree_spd(5, 2)),
]


@pytest.mark.parametrize("name, make", CASES)
def test_logdet_and_its_gradient_equal_the_dense_ones(name, make):
    pattern, values, A = make()
    v = values.clone().requires_grad_(True)
    value = sparse_logdet(pattern, v)
    (grad,) = torch.autograd.grad(value, v)
    w = values.clone().requires_grad_(True)
    dense = torch.logdet(pattern.to_dense(w))
    (expected,) = torch.autograd.grad(dense, w)
    torch.testing.assert_close(value, dense, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, make", CASES)
def test_solves_and_their_gradients_equal_the_dense_ones(name, make):
    pattern, values, A = make()
    g = torch.Generator().manual_seed(3)
    for shape in ((pattern.n,), (pattern.n, 3)):
        b = torch.randn(shape, generator=g, dtype=torch.float64)
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        inputs = [values.clone().requires_grad_(True), b.clone().requires_grad_(True)]
        x = sparse_solve(pattern, *inputs)
        grads = torch.autograd.grad((x * w).sum(), inputs)
        ref_inputs = [values.clone().requires_grad_(True), b.clone().requires_grad_(True)]
        x_ref = torch.linalg.solve(pattern.to_dense(ref_inputs[0]), ref_inputs[1])
        ref_grads = torch.autograd.grad((x_ref * w).sum(), ref_inputs)
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-10)
        for got, expected in zip(grads, ref_grads):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, make", CASES)
def test_the_sparse_inverse_subset_is_the_inverse_on_the_pattern(name, make):
    pattern, values, A = make()
    z = sparse_inverse_subset(pattern, values)
    inverse = torch.linalg.inv(A)
    torch.testing.assert_close(z, inverse[pattern.rows, pattern.cols], rtol=0, atol=1e-12)


def test_draws_have_the_inverse_as_covariance():
    pattern, values, A = random_spd(12, 0.3, 4)
    factor = pattern.factor(values)
    eps = np.random.default_rng(0).normal(size=(12, 200_000))
    covariance = np.cov(factor.draw(eps))
    np.testing.assert_allclose(covariance, torch.linalg.inv(A).numpy(), atol=5e-4)


def test_a_tree_is_factored_without_fill():
    pattern, values, _ = tree_spd(8, 5)
    assert pattern.factor(values).nnz == pattern.nnz
    crossed, values, _ = random_spd(60, 0.08, 0)
    assert crossed.factor(values).nnz > crossed.nnz  # a general pattern fills in


def test_an_indefinite_matrix_has_no_laplace_approximation():
    pattern = SparsePattern(2, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    values = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)  # [[1, 2], [2, 1]]
    with pytest.raises(NoLaplaceApproximation, match="not negative definite"):
        sparse_logdet(pattern, values)


def test_bad_patterns_are_refused_by_name():
    with pytest.raises(ValueError, match="lower triangle"):
        SparsePattern(2, torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="diagonal"):
        SparsePattern(2, torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="duplicate"):
        SparsePattern(1, torch.tensor([0, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        SparsePattern(2, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("name, make", CASES)
def test_draws_are_reparameterised_with_the_exact_expected_gradient(name, make):
    """For f(z) = zᵀWz the pathwise gradient is quadratic in ε, so its mean
    over ε is the sum over the basis vectors: it must equal ∇_A tr(W A⁻¹)."""
    from curvi.sparse_cholesky import sparse_draw

    pattern, values, A = make()
    n = pattern.n
    g = torch.Generator().manual_seed(7)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = W + W.T
    v = values.clone().requires_grad_(True)
    z = sparse_draw(pattern, v, torch.eye(n, dtype=torch.float64))  # every basis vector at once
    torch.testing.assert_close(z @ z.T, torch.linalg.inv(A), rtol=0, atol=1e-10)  # C⁻ᵀ C⁻¹ = A⁻¹
    (grad,) = torch.autograd.grad((z * (W @ z)).sum(), v)
    w = values.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.trace(W @ torch.linalg.inv(pattern.to_dense(w))), w)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-9)


def test_bad_values_and_right_hand_sides_are_refused_by_name():
    pattern, values, _ = random_spd(6, 0.5, 8)
    with pytest.raises(ValueError, match="values must have shape"):
        sparse_logdet(pattern, values[:-1])
    with pytest.raises(ValueError, match="not finite"):
        sparse_logdet(pattern, torch.where(torch.arange(values.numel()) == 0, torch.nan, values))
    with pytest.raises(ValueError, match="b must have shape"):
        sparse_solve(pattern, values, torch.ones(5, dtype=torch.float64))
    # a second factor of the pattern reuses the first one's ordering, and agrees
    first, second = pattern.factor(values), pattern.factor(values)
    assert (first.order == second.order).all() and first.logdet() == second.logdet()
