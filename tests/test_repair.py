import math

import pytest
import torch

from curvi.repair import (
    Clip,
    Jitter,
    RepairResult,
    SoftAbs,
    SoftplusFloor,
    as_repair,
    spectral_map,
)

DTYPE = torch.float64

SPECTRAL = [
    SoftAbs(alpha=1e3),
    SoftAbs(alpha=3.0),
    SoftplusFloor(floor=1e-3),
    SoftplusFloor(floor=0.5),
    Clip(floor=1e-3),
    Clip(floor=0.5),
]
ALL = SPECTRAL + [Jitter(floor=1e-3), Jitter(floor=0.5)]


# ---------------------------------------------------------------------------
# helpers


def random_orthogonal(n, gen):
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return Q * torch.sign(torch.diagonal(R))


def with_eigvals(eigvals, seed=0):
    """A dense symmetric matrix with the given spectrum and a random basis."""
    gen = torch.Generator().manual_seed(seed)
    lam = torch.as_tensor(eigvals, dtype=DTYPE)
    Q = random_orthogonal(len(lam), gen)
    M = Q @ torch.diag(lam) @ Q.mT
    return 0.5 * (M + M.mT)


def random_sym(n, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return 0.5 * (X + X.mT)


def reference_f(repair, lam):
    """Independent scalar formulas for the spectral maps."""
    if isinstance(repair, SoftAbs):
        return [l / math.tanh(repair.alpha * l) for l in lam]
    if isinstance(repair, SoftplusFloor):
        fl = repair.floor
        softplus = lambda t: max(t, 0.0) + math.log1p(math.exp(-abs(t)))  # noqa: E731
        return [fl + fl * softplus((l - fl) / fl) for l in lam]
    if isinstance(repair, Clip):
        return [max(l, repair.floor) for l in lam]
    raise TypeError(repair)


def directional_fd(fn, X, E, h=1e-4):
    """Fourth-order central difference of scalar fn at X along E."""
    vals = [fn(X + s * h * E) for s in (2, 1, -1, -2)]
    return (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)


def autograd_directional(fn, X, E):
    X = X.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(X), X)
    assert torch.isfinite(g).all()
    return (g * E).sum()


def weighted_loss(repair, W):
    return lambda M: (W * repair(M).matrix).sum()


# ---------------------------------------------------------------------------
# values


@pytest.mark.parametrize("repair", SPECTRAL, ids=repr)
def test_spectral_value_matches_eigendecomposition(repair):
    lam = [-2.0, -0.3, 0.2, 0.7, 2.5]
    M = with_eigvals(lam, seed=1)
    out = repair(M)
    assert isinstance(out, RepairResult)
    f = torch.tensor(reference_f(repair, lam), dtype=DTYPE)
    evals, Q = torch.linalg.eigh(M)
    expected = Q @ torch.diag(f) @ Q.mT
    torch.testing.assert_close(out.matrix, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.eigvals_before, torch.tensor(lam, dtype=DTYPE))
    torch.testing.assert_close(out.eigvals_after, f, rtol=1e-12, atol=1e-14)
    assert torch.linalg.eigvalsh(out.matrix).min() > 0


@pytest.mark.parametrize("repair", ALL, ids=repr)
def test_batched_equals_one_by_one(repair):
    M = torch.stack([random_sym(4, seed) for seed in range(6)]).reshape(2, 3, 4, 4)
    out = repair(M)
    assert out.matrix.shape == (2, 3, 4, 4)
    assert out.eigvals_before.shape == out.eigvals_after.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            single = repair(M[i, j])
            torch.testing.assert_close(out.matrix[i, j], single.matrix, rtol=1e-12, atol=1e-12)
    assert (torch.linalg.eigvalsh(out.matrix) > 0).all()


@pytest.mark.parametrize("floor", [1e-3, 0.5])
def test_jitter_value(floor):
    M = with_eigvals([-1.0, 0.2, 3.0], seed=2)
    out = Jitter(floor=floor)(M)
    shift = floor + 1.0
    torch.testing.assert_close(out.matrix, M + shift * torch.eye(3, dtype=DTYPE))
    assert torch.linalg.eigvalsh(out.matrix).min().item() == pytest.approx(floor, abs=1e-12)
    pd = with_eigvals([1.0, 2.0], seed=3)
    torch.testing.assert_close(Jitter(floor=floor)(pd).matrix, pd)


def test_softabs_near_zero():
    sa = SoftAbs(alpha=1e3)
    lam = torch.tensor([0.0, 1e-12, -1e-9, 5e-5, 9.99e-5, 1.0e-4, 1.001e-4, -3e-4], dtype=DTYPE)
    f, df = sa.f(lam), sa.df(lam)
    assert torch.isfinite(f).all() and torch.isfinite(df).all()
    assert f[0].item() == pytest.approx(1e-3, rel=1e-15)
    assert df[0].item() == 0.0
    # across the series / direct switch at |αλ| = 0.1
    for x in lam[3:].tolist():
        X = 1e3 * x
        assert sa.f(torch.tensor(x, dtype=DTYPE)).item() == pytest.approx(
            x * math.cosh(X) / math.sinh(X), rel=1e-14
        )
    # f' against a finite difference of f, including through the switch
    grid = torch.linspace(-5e-3, 5e-3, 201, dtype=DTYPE)
    h = 1e-8
    fd = (sa.f(grid + h) - sa.f(grid - h)) / (2 * h)
    torch.testing.assert_close(sa.df(grid), fd, rtol=1e-6, atol=1e-6)


def test_identity_is_mapped_exactly():
    for repair in SPECTRAL:
        c = 0.7
        out = repair(c * torch.eye(4, dtype=DTYPE))
        fc = reference_f(repair, [c])[0]
        torch.testing.assert_close(out.matrix, fc * torch.eye(4, dtype=DTYPE))


# ---------------------------------------------------------------------------
# gradients


# (spectrum, finite-difference step): the step must resolve the 1/alpha scale
GRAD_MATRICES = {
    "separated": ([-2.0, -0.4, 0.3, 1.7], 1e-4),
    "near_zero": ([-1.5, 1e-4, 0.9, 2.0], 1e-6),
    "repeated": ([-1.0, 0.8, 0.8, 2.0], 1e-4),
    "nearly_repeated": ([-1.0, 0.8, 0.8 + 1e-11, 2.0], 1e-4),
}


@pytest.mark.parametrize("name", list(GRAD_MATRICES))
@pytest.mark.parametrize("repair", SPECTRAL + [Jitter(floor=1e-3)], ids=repr)
def test_gradient_finite_differences(repair, name):
    spectrum, h = GRAD_MATRICES[name]
    M = with_eigvals(spectrum, seed=4)
    W = random_sym(4, seed=5)
    E = random_sym(4, seed=6)
    loss = weighted_loss(repair, W)
    fd = directional_fd(loss, M, E, h=h)
    ad = autograd_directional(loss, M, E)
    assert ad.item() == pytest.approx(fd.item(), rel=1e-7, abs=1e-9)


# Jitter is not differentiable at c·I with c < floor (repeated smallest eigenvalue).
@pytest.mark.parametrize(
    "repair, c",
    [(r, c) for r in SPECTRAL for c in (-0.6, 1.3)] + [(Jitter(floor=1e-3), 1.3)],
    ids=repr,
)
def test_gradient_at_multiple_of_identity(repair, c):
    M = c * torch.eye(5, dtype=DTYPE)
    W = random_sym(5, seed=7)
    for seed in (8, 9):
        E = random_sym(5, seed=seed)
        loss = weighted_loss(repair, W)
        fd = directional_fd(loss, M, E)
        ad = autograd_directional(loss, M, E)
        assert ad.item() == pytest.approx(fd.item(), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("repair", SPECTRAL, ids=repr)
def test_gradient_at_identity_is_fprime(repair):
    c = 0.9
    M = (c * torch.eye(3, dtype=DTYPE)).requires_grad_()
    W = random_sym(3, seed=10)
    (repair(M).matrix * W).sum().backward()
    dfc = repair.df(torch.tensor(c, dtype=DTYPE))
    torch.testing.assert_close(M.grad, dfc * W, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("repair", SPECTRAL, ids=repr)
def test_gradient_matches_eigh_autograd(repair):
    """Well-separated eigenvalues: torch.linalg.eigh's own backward is exact."""
    M = with_eigvals([-2.0, -0.4, 0.3, 1.1, 2.6], seed=11)
    W = random_sym(5, seed=12)

    def via_eigh(X):
        lam, Q = torch.linalg.eigh(X)
        return Q @ torch.diag_embed(repair.f(lam)) @ Q.mT

    X1 = M.clone().requires_grad_()
    (repair(X1).matrix * W).sum().backward()
    X2 = M.clone().requires_grad_()
    (via_eigh(X2) * W).sum().backward()
    sym = lambda G: 0.5 * (G + G.mT)  # noqa: E731
    torch.testing.assert_close(sym(X1.grad), sym(X2.grad), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("repair", [SoftAbs(alpha=3.0), Jitter(floor=0.5)], ids=repr)
def test_input_with_autograd_history(repair):
    """M = Hessian built with create_graph=True; gradient flows to its inputs."""

    def log_density(x):
        return -(x**4).sum() / 4 + x[0] * x[1] * x[2] + 0.5 * (x**2).sum()

    def loss(x):
        x = x.clone().requires_grad_() if not x.requires_grad else x
        (g,) = torch.autograd.grad(log_density(x), x, create_graph=True)
        H = torch.stack([torch.autograd.grad(g[i], x, create_graph=True)[0] for i in range(3)])
        return repair(-H).matrix.logdet()

    x = torch.tensor([0.3, -1.1, 0.7], dtype=DTYPE, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(x), x)
    assert torch.isfinite(grad).all()
    for i in range(3):
        e = torch.zeros(3, dtype=DTYPE)
        e[i] = 1.0
        with torch.enable_grad():
            fd = directional_fd(lambda y: loss(y.detach()).detach(), x.detach(), e)
        assert grad[i].item() == pytest.approx(fd.item(), rel=1e-7, abs=1e-9)


# ---------------------------------------------------------------------------
# spectral_map, as_repair, errors


def test_spectral_map_custom_function():
    M = torch.eye(3, dtype=DTYPE).requires_grad_()
    out = spectral_map(M, torch.exp, torch.exp)
    out.matrix.trace().backward()
    torch.testing.assert_close(M.grad, math.e * torch.eye(3, dtype=DTYPE))


def test_as_repair():
    assert as_repair(None) is None
    assert isinstance(as_repair("softabs"), SoftAbs)
    assert isinstance(as_repair("softplus"), SoftplusFloor)
    assert isinstance(as_repair("clip"), Clip)
    assert isinstance(as_repair("jitter"), Jitter)
    r = Clip(floor=0.1)
    assert as_repair(r) is r
    for bad in ("abs", 3, object()):
        with pytest.raises(ValueError, match="softabs.*softplus.*clip.*jitter"):
            as_repair(bad)


@pytest.mark.parametrize("cls", [SoftAbs, SoftplusFloor, Clip, Jitter])
def test_bad_parameters(cls):
    with pytest.raises(ValueError, match="expected"):
        cls(0.0)


def test_float32_and_empty():
    M = with_eigvals([-1.0, 2.0], seed=13).float()
    for repair in ALL:
        out = repair(M)
        assert out.matrix.dtype == torch.float32
        assert torch.linalg.eigvalsh(out.matrix).min() > 0
        empty = repair(torch.zeros(0, 0, dtype=DTYPE))
        assert empty.matrix.shape == (0, 0)
