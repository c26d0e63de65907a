"""K-FAC blocks (curvi.kfac) against dense Gauss–Newton blocks, float64.

Where K-FAC is exact and where it approximates (curvi/kfac.py's docstring):

* one datum (one row): a layer's block of J ᵀ H J is exactly A ⊗ G, for
  every layer of a deep network (the diagonal blocks);
* many data: exact when every datum's backpropagated G_n is the same (a
  linear layer straight into z with constant H), an approximation
  otherwise (measured below);
* blocks between layers are dropped (block-diagonal approximation).

The Kronecker order: a layer's parameters are the matrix ``[W b]``
``(d_out, d_in + 1)`` flattened row-major, so its block is ``kron(G, A)``.
"""

import inspect
import textwrap

import pytest
import torch
from pyro.nn.auto_reg_nn import MaskedLinear
from torch import nn

from curvi.kfac import KroneckerLayer, LayerRecorder, input_factor, is_supported, output_factor


def spd(k, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(k, k, generator=g)
    return M @ M.T + 0.5 * torch.eye(k)


def flat_params(layer):
    """``[W b]`` of a linear/conv layer flattened row-major."""
    return KroneckerLayer(layer).gradient_matrix([layer.weight, layer.bias]).reshape(-1)


def dense_ggn(net, layers, x, H):
    """Σ_n J_nᵀ H J_n over the parameters ``[W b]`` of ``layers`` (in order), dense."""

    def outputs(flat):
        chunks, offset = {}, 0
        for layer in layers:
            w, b = layer.weight, layer.bias
            n_w, n_b = w.numel(), b.numel()
            block = flat[offset : offset + n_w + n_b].reshape(w.shape[0], -1)
            chunks[layer] = (block[:, :-1].reshape(w.shape), block[:, -1])
            offset += n_w + n_b
        values = {}
        for layer, (w, b) in chunks.items():
            for name, t in (("weight", w), ("bias", b)):
                values[(layer, name)] = t
        return torch.func.functional_call(
            net, {f"{_path(net, layer)}.{name}": t for (layer, name), t in values.items()}, (x,)
        )

    flat = torch.cat([flat_params(layer) for layer in layers])
    J = torch.func.jacrev(outputs)(flat)  # (n, k, P)
    return torch.einsum("nkp,kl,nlq->pq", J, H, J)


def _path(net, layer):
    for name, module in net.named_modules():
        if module is layer:
            return name
    raise AssertionError


def kfac_factors(net, layers, x, H):
    """A and G of each layer from the machinery: recorded inputs, and the
    columns of chol(H) backpropagated from the output (exact expectation)."""
    with LayerRecorder() as recorder:
        z = net(x)
    L = torch.linalg.cholesky(H)
    outputs = [out for layer in layers for _, out in recorder.calls[layer]]
    G = {layer: 0 for layer in layers}
    for j in range(H.shape[0]):
        v = L[:, j].expand_as(z)
        grads = torch.autograd.grad(z, outputs, grad_outputs=v, retain_graph=True)
        for layer, g in zip(layers, grads, strict=True):
            G[layer] = G[layer] + output_factor(KroneckerLayer(layer).output_rows(g))
    A = {
        layer: input_factor(KroneckerLayer(layer).input_rows(recorder.calls[layer][0][0])) for layer in layers
    }
    return A, G


def blocks_of(M, sizes):
    out, offset = [], 0
    for size in sizes:
        out.append(M[offset : offset + size, offset : offset + size])
        offset += size
    return out


def test_one_layer_one_datum_is_exact():
    layer = nn.Linear(3, 2)
    net = nn.Sequential(layer)
    x, H = torch.randn(1, 3), spd(2, 0)
    A, G = kfac_factors(net, [layer], x, H)
    exact = dense_ggn(net, [layer], x, H)
    torch.testing.assert_close(torch.kron(G[layer], A[layer]), exact, rtol=1e-12, atol=1e-12)


def test_two_layers_one_datum_diagonal_blocks_exact_cross_blocks_dropped():
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    net = nn.Sequential(first, nn.Tanh(), second)
    x, H = torch.randn(1, 3), spd(2, 1)
    A, G = kfac_factors(net, [first, second], x, H)
    exact = dense_ggn(net, [first, second], x, H)
    sizes = [4 * 4, 2 * 5]
    for layer, block in zip([first, second], blocks_of(exact, sizes), strict=True):
        torch.testing.assert_close(torch.kron(G[layer], A[layer]), block, rtol=1e-10, atol=1e-12)
    # the cross block is not zero: treating layers as independent is an approximation
    assert exact[: sizes[0], sizes[0] :].abs().max() > 1e-3


def test_many_data_exact_when_every_output_gradient_is_the_same():
    # a linear layer straight into z with the same H for every datum:
    # Σ_n a_n a_nᵀ ⊗ H = (mean_n a_n a_nᵀ) ⊗ (N H) = A ⊗ G
    layer = nn.Linear(3, 2)
    net = nn.Sequential(layer)
    x, H = torch.randn(7, 3), spd(2, 2)
    A, G = kfac_factors(net, [layer], x, H)
    torch.testing.assert_close(G[layer], 7 * H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.kron(G[layer], A[layer]), dense_ggn(net, [layer], x, H), rtol=1e-12, atol=1e-12
    )


def test_many_data_through_a_nonlinearity_is_an_approximation():
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    net = nn.Sequential(first, nn.Tanh(), second)
    x, H = 2 * torch.randn(20, 3), spd(2, 3)
    A, G = kfac_factors(net, [first, second], x, H)
    exact_first, exact_second = blocks_of(dense_ggn(net, [first, second], x, H), [16, 10])
    # the last layer maps straight to z: every datum's G_n is H, so exact
    torch.testing.assert_close(torch.kron(G[second], A[second]), exact_second, rtol=1e-10, atol=1e-12)
    # the first layer's inputs and output gradients are correlated through
    # tanh': an approximation (relative Frobenius error measured 0.43)
    error = (torch.kron(G[first], A[first]) - exact_first).norm() / exact_first.norm()
    assert 0.05 < error < 0.8


def test_sampled_output_vectors_are_unbiased_for_g():
    # v = L ξ with E[v vᵀ] = H: G from many draws (one datum repeated as many
    # rows, one backward pass) approaches the exact-expectation G
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    net = nn.Sequential(first, nn.Tanh(), second)
    x, H = torch.randn(1, 3), spd(2, 4)
    _, G_exact = kfac_factors(net, [first, second], x, H)
    draws = 20000
    with LayerRecorder() as recorder:
        z = net(x.expand(draws, 3))
    v = torch.randn(draws, 2, generator=torch.Generator().manual_seed(5)) @ torch.linalg.cholesky(H).T
    (g,) = torch.autograd.grad(z, [recorder.calls[first][0][1]], grad_outputs=v)
    G_sampled = output_factor(g) / draws
    torch.testing.assert_close(G_sampled, G_exact[first], rtol=0.05, atol=0.05 * G_exact[first].abs().max())


def test_precondition_is_the_damped_kronecker_inverse():
    layer = nn.Linear(3, 2)
    block = KroneckerLayer(layer)
    a, g = torch.randn(10, 3), torch.randn(10, 2)
    block.update_factors(input_factor(block.input_rows(a)), output_factor(g), decay=0.9)
    block.update_inverse()
    V = torch.randn(2, 4)
    damping = 0.1
    A, G = block.A, block.G
    lam = damping * torch.linalg.eigvalsh(A).mean() * torch.linalg.eigvalsh(G).mean()
    dense = torch.linalg.solve(torch.kron(G, A) + lam * torch.eye(8), V.reshape(-1))
    U = block.precondition(V, damping=damping)
    torch.testing.assert_close(U.reshape(-1), dense, rtol=1e-10, atol=1e-12)
    # undamped: the exact inverse of A ⊗ G
    dense0 = torch.linalg.solve(torch.kron(G, A), V.reshape(-1))
    torch.testing.assert_close(block.precondition(V, damping=0.0).reshape(-1), dense0, rtol=1e-8, atol=1e-10)


def test_running_average_and_state_round_trip():
    block = KroneckerLayer(nn.Linear(2, 2))
    A1, G1, A2, G2 = spd(3, 6), spd(2, 7), spd(3, 8), spd(2, 9)
    block.update_factors(A1, G1, decay=0.9)
    block.update_factors(A2, G2, decay=0.9)
    torch.testing.assert_close(block.A, 0.9 * A1 + 0.1 * A2)
    torch.testing.assert_close(block.G, 0.9 * G1 + 0.1 * G2)
    block.update_inverse()
    other = KroneckerLayer(block.module)
    other.set_state(block.get_state())
    V = torch.randn(2, 3)
    assert torch.equal(other.precondition(V, damping=1e-3), block.precondition(V, damping=1e-3))


def test_conv2d_rows_give_the_weight_gradient_and_one_position_is_exact():
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
    x = torch.randn(2, 2, 5, 5)
    with LayerRecorder() as recorder:
        out = conv(x)
    block = KroneckerLayer(conv)
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, [recorder.calls[conv][0][1]], grad_outputs=w, retain_graph=True)
    grads = torch.autograd.grad(out, [conv.weight, conv.bias], grad_outputs=w)
    rows_a, rows_g = block.input_rows(x), block.output_rows(g)
    # [∇W ∇b] = Σ_rows g aᵀ: the unfolding puts patches and output gradients in matching rows
    torch.testing.assert_close(rows_g.T @ rows_a, block.gradient_matrix(list(grads)))

    # a kernel covering the whole image (one output position) and one datum: exact
    conv1 = nn.Conv2d(2, 2, kernel_size=3)
    net = nn.Sequential(conv1, nn.Flatten())
    x1, H = torch.randn(1, 2, 3, 3), spd(2, 10)
    A, G = kfac_factors(net, [conv1], x1, H)
    torch.testing.assert_close(
        torch.kron(G[conv1], A[conv1]), dense_ggn(net, [conv1], x1, H), rtol=1e-12, atol=1e-12
    )


def test_masked_layer_update_is_masked():
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    layer = MaskedLinear(3, 2, mask)
    block = KroneckerLayer(layer)
    assert block.mask is not None
    block.update_factors(spd(4, 11), spd(2, 12), decay=0.9)
    block.update_inverse()
    V = torch.randn(2, 4)
    U = block.precondition(V, damping=1e-3)
    assert (U[:, :3][mask == 0] == 0).all()
    assert (U[:, 3] != 0).all()  # the bias is not masked
    unmasked = U.clone()
    block.mask = None
    assert (block.precondition(V, damping=1e-3)[:, :3][mask == 0] != 0).all() and not torch.equal(
        block.precondition(V, damping=1e-3), unmasked
    )


def test_supported_layers_and_bad_module():
    assert is_supported(nn.Linear(2, 2)) and is_supported(MaskedLinear(2, 2, torch.ones(2, 2)))
    assert is_supported(nn.Conv2d(1, 1, 3))
    assert not is_supported(nn.Conv2d(2, 2, 3, groups=2)) and not is_supported(nn.Conv1d(1, 1, 3))
    with pytest.raises(ValueError, match="module must be an nn.Linear"):
        KroneckerLayer(nn.Conv1d(1, 1, 3))


def test_kronecker_layer_usage_runs():
    doc = inspect.getdoc(KroneckerLayer)
    code = textwrap.dedent(doc.split("Usage::", 1)[1].split("\n:param", 1)[0])
    exec(compile(code, "<KroneckerLayer usage>", "exec"), {"torch": torch})
