import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from curvi.arrowhead import (
    ArrowheadCholesky,
    ArrowheadPrecision,
    PrecisionCholeskyNormal,
    RepairReport,
    arrowhead_matvec,
    arrowhead_to_dense,
)
from curvi.repair import Clip, Jitter, SoftAbs, SoftplusFloor, as_repair

DTYPE = torch.float64
TOL = 1e-10

# (N, k, p): k = 1, p = 0, N = 1 included
CASES = [(5, 2, 3), (4, 1, 2), (3, 3, 0), (1, 2, 4), (1, 1, 1), (6, 3, 2)]
REPAIRS = [None, SoftAbs(), SoftplusFloor(floor=0.1), Clip(floor=0.1), Jitter(floor=0.1)]


# ---------------------------------------------------------------------------
# random instances


def _orthogonal(n, gen):
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return Q * torch.sign(torch.diagonal(R))


def _sym_with_eigvals(lam, gen):
    Q = _orthogonal(len(lam), gen)
    M = Q @ torch.diag(lam) @ Q.mT
    return 0.5 * (M + M.mT)


def _spectrum(n, gen, negative=False):
    """Eigenvalues in [0.5, 3]; with ``negative``, a random nonempty subset flipped."""
    lam = 0.5 + 2.5 * torch.rand(n, generator=gen, dtype=DTYPE)
    if negative:
        flip = torch.rand(n, generator=gen) < 0.5
        flip[torch.randint(n, (1,), generator=gen)] = True
        lam = torch.where(flip, -lam, lam)
    return lam


def make_blocks(N, k, p, seed, indefinite_units=(), indefinite_schur=False, b_scale=0.5):
    """
    Seeded arrowhead blocks (A, B, D). Units listed in ``indefinite_units`` get
    an indefinite Dᵢ. Unless ``indefinite_schur``, A = Σ BᵢᵀDᵢ⁻¹Bᵢ + S₀ with S₀ PD
    (so P is PD when every Dᵢ is); otherwise A is a random indefinite matrix.
    """
    gen = torch.Generator().manual_seed(seed)
    D = torch.stack([_sym_with_eigvals(_spectrum(k, gen, i in indefinite_units), gen) for i in range(N)])
    B = b_scale * torch.randn(N, k, p, generator=gen, dtype=DTYPE)
    if indefinite_schur:
        A = _sym_with_eigvals(_spectrum(p, gen, negative=p > 0), gen)
    else:
        BtDinvB = torch.einsum("nkp,nkl,nlq->pq", B, torch.linalg.inv(D), B)
        A = 0.5 * (BtDinvB + BtDinvB.mT) + _sym_with_eigvals(_spectrum(p, gen), gen)
    return A, B, D


def make_precision(N, k, p, repair, seed=0):
    """PD instance without repair; indefinite everywhere with a repair."""
    if repair is None:
        return make_blocks(N, k, p, seed)
    return make_blocks(N, k, p, seed, indefinite_units=range(N), indefinite_schur=True)


def random_pair(batch, N, k, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*batch, p, generator=gen, dtype=DTYPE),
        torch.randn(*batch, N, k, generator=gen, dtype=DTYPE),
    )


def flat(pair):
    """(…, p), (…, N, k) → (…, p + N k) in the (θ, y) ordering."""
    theta, y = pair
    batch = torch.broadcast_shapes(theta.shape[:-1], y.shape[:-2])
    theta = theta.expand(*batch, theta.shape[-1])
    y = y.expand(*batch, *y.shape[-2:])
    return torch.cat([theta, y.flatten(-2)], dim=-1)


def assert_rel(actual, expected, tol=TOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.norm().clamp(min=1e-300)
    err = (actual - expected).norm() / scale
    assert err <= tol, f"relative error {err:.3e} > {tol:g}"


@pytest.fixture(
    params=[(case, r) for case in CASES for r in REPAIRS],
    ids=lambda cr: f"N{cr[0][0]}k{cr[0][1]}p{cr[0][2]}-{cr[1]!r}",
)
def instance(request):
    (N, k, p), repair = request.param
    A, B, D = make_precision(N, k, p, repair, seed=N * 100 + k * 10 + p)
    P = ArrowheadPrecision(A, B, D, repair=repair)
    return P, P.to_dense(), (N, k, p)


# ---------------------------------------------------------------------------
# layout helpers


def test_dense_layout_convention():
    N, k, p = 3, 2, 2
    A, B, D = make_blocks(N, k, p, seed=1)
    dense = arrowhead_to_dense(A, B, D)
    assert dense.shape == (p + N * k, p + N * k)
    torch.testing.assert_close(dense[:p, :p], A)
    for i in range(N):
        for l in range(k):
            row = p + i * k + l
            torch.testing.assert_close(dense[row, :p], B[i, l])
            torch.testing.assert_close(dense[:p, row], B[i, l])
            for j in range(N):
                block = dense[row, p + j * k : p + (j + 1) * k]
                expected = D[i, l] if i == j else torch.zeros(k, dtype=DTYPE)
                torch.testing.assert_close(block, expected)


def test_matvec_broadcasts_batches():
    N, k, p = 4, 2, 3
    A, B, D = make_blocks(N, k, p, seed=2)
    v = (random_pair((2, 1), N, k, p, 3)[0], random_pair((3,), N, k, p, 4)[1])
    out_theta, out_y = arrowhead_matvec(A, B, D, v)
    assert out_theta.shape == (2, 3, p) and out_y.shape == (2, 3, N, k)
    expected = flat(v) @ arrowhead_to_dense(A, B, D).mT
    assert_rel(flat((out_theta, out_y)), expected)


# ---------------------------------------------------------------------------
# every operation against the dense matrix


def test_dense_is_symmetric_pd(instance):
    P, dense, _ = instance
    torch.testing.assert_close(dense, dense.mT, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() > 0


def test_properties(instance):
    P, dense, (N, k, p) = instance
    assert (P.num_units, P.local_dim, P.global_dim) == (N, k, p)
    assert P.A.shape == (p, p) and P.B.shape == (N, k, p) and P.D.shape == (N, k, k)
    assert P.dtype == DTYPE and P.device == dense.device
    assert P.cholesky is P.cholesky  # cached
    assert (P.report is None) == (P.repair is None)


def test_cholesky_is_cholesky_of_permuted(instance):
    P, dense, (N, k, p) = instance
    perm = list(range(p, p + N * k)) + list(range(p))
    expected = torch.linalg.cholesky(dense[perm][:, perm])
    chol = P.cholesky
    assert isinstance(chol, ArrowheadCholesky)
    assert chol.L_D.shape == (N, k, k) and chol.W.shape == (N, k, p)
    assert chol.L_S.shape == (p, p)
    assert_rel(chol.to_dense(), expected)


def test_log_det(instance):
    P, dense, _ = instance
    sign, logabsdet = torch.linalg.slogdet(dense)
    assert sign == 1
    assert_rel(P.log_det(), logabsdet)


def test_schur_and_marginal_global(instance):
    P, dense, (N, k, p) = instance
    cov_theta = torch.linalg.inv(dense)[:p, :p]
    if p > 0:
        assert_rel(P.marginal_global(), torch.linalg.inv(cov_theta))
    assert P.schur.shape == (p, p)
    assert_rel(P.schur, P.marginal_global(), tol=0)


def test_matvec(instance):
    P, dense, (N, k, p) = instance
    v = random_pair((2, 3), N, k, p, seed=5)
    assert_rel(flat(P.matvec(v)), flat(v) @ dense.mT)


def test_solve(instance):
    P, dense, (N, k, p) = instance
    b = random_pair((2, 3), N, k, p, seed=6)
    x = P.solve(b)
    assert x[0].shape == (2, 3, p) and x[1].shape == (2, 3, N, k)
    expected = torch.linalg.solve(dense, flat(b).unsqueeze(-1)).squeeze(-1)
    assert_rel(flat(x), expected)


def test_log_prob_and_entropy(instance):
    P, dense, (N, k, p) = instance
    x = random_pair((4, 2), N, k, p, seed=7)
    loc = random_pair((2,), N, k, p, seed=8)
    mvn = MultivariateNormal(flat(loc), precision_matrix=dense)
    assert_rel(P.log_prob(x, loc), mvn.log_prob(flat(x)))
    zero = MultivariateNormal(torch.zeros(len(dense), dtype=DTYPE), precision_matrix=dense)
    assert_rel(P.log_prob(x), zero.log_prob(flat(x)))
    assert_rel(P.entropy(), zero.entropy())


def test_sample_covariance(instance):
    P, dense, (N, k, p) = instance
    d = p + N * k
    eye = torch.eye(d, dtype=DTYPE)
    eps = (eye[:, :p], eye[:, p:].reshape(d, N, k))  # batch of basis vectors
    T = flat(P.sample(eps)).mT  # column j = δ(e_j)
    assert_rel(T @ T.mT, torch.linalg.inv(dense))
    # linear in eps: a batch of draws is T ε
    eps2 = random_pair((5,), N, k, p, seed=9)
    assert_rel(flat(P.sample(eps2)), flat(eps2) @ T.mT)


def test_conditional_local(instance):
    P, dense, (N, k, p) = instance
    cov = torch.linalg.inv(dense)
    delta_theta = random_pair((3,), N, k, p, seed=10)[0]
    if p > 0:
        gain = cov[p:, :p] @ torch.linalg.inv(cov[:p, :p])
        mean = delta_theta @ gain.mT
        cond_cov = cov[p:, p:] - gain @ cov[:p, p:]
    else:
        mean = torch.zeros(3, N * k, dtype=DTYPE)
        cond_cov = cov
    dist = P.conditional_local(delta_theta)
    assert dist.batch_shape == (3, N) and dist.event_shape == (k,)
    assert_rel(dist.loc.flatten(-2), mean, tol=TOL if p > 0 else 0)
    assert_rel(P.conditional_mean(delta_theta).flatten(-2), mean, tol=TOL if p > 0 else 0)
    block_cov = arrowhead_to_dense(
        torch.zeros(0, 0, dtype=DTYPE),
        torch.zeros(N, k, 0, dtype=DTYPE),
        dist.covariance_matrix[0],
    )
    assert_rel(block_cov, cond_cov)  # also: the conditional is block diagonal
    assert_rel(dist.precision_matrix[0], P.D)
    # it is built on the factors of the Dᵢ, not a new factorisation
    assert dist._unbroadcasted_precision_tril is P.cholesky.L_D


def test_M_and_covariance_blocks(instance):
    P, dense, (N, k, p) = instance
    assert_rel(P.M, torch.linalg.solve(P.D, P.B))
    cov = torch.linalg.inv(dense)
    cov_theta, cov_y_theta, cov_y = P.covariance_blocks()
    assert_rel(cov_theta, cov[:p, :p])
    if p > 0:
        assert_rel(cov_y_theta.reshape(N * k, p), cov[p:, :p])
    local = torch.stack([cov[p + i * k : p + (i + 1) * k, p + i * k : p + (i + 1) * k] for i in range(N)])
    assert_rel(cov_y, local)
    var_theta, var_y = P.marginal_variances()
    assert_rel(torch.cat([var_theta, var_y.reshape(-1)]), cov.diagonal())
    assert_rel(P.global_covariance(), cov[:p, :p])


@pytest.mark.parametrize("cross_scale", [1.0, 0.5])
def test_with_schur_is_the_dense_precision_and_reuses_the_unit_factors(instance, cross_scale):
    P, dense, (N, k, p) = instance
    gen = torch.Generator().manual_seed(30)
    root = torch.randn(p, p, generator=gen, dtype=DTYPE)
    S = root @ root.mT + torch.eye(p, dtype=DTYPE)
    Q = P.with_schur(S, cross_scale=cross_scale)
    assert Q.cholesky.L_D is P.cholesky.L_D and Q.D is P.D
    B = cross_scale * P.B
    A = S + torch.einsum("nkp,nkl,nlq->pq", B, torch.linalg.inv(P.D), B)
    assert_rel(Q.to_dense(), arrowhead_to_dense(A, B, P.D))
    assert_rel(Q.schur, S, tol=0)
    assert_rel(Q.M, cross_scale * P.M)
    eps = random_pair((3,), N, k, p, seed=31)
    cov = torch.linalg.inv(Q.to_dense())
    T = torch.linalg.cholesky(cov)  # any square root: compare covariances, not draws
    d = p + N * k
    eye = torch.eye(d, dtype=DTYPE)
    U = flat(Q.sample((eye[:, :p], eye[:, p:].reshape(d, N, k)))).mT
    assert_rel(U @ U.mT, T @ T.mT)
    assert_rel(Q.log_prob(eps), MultivariateNormal(torch.zeros(d, dtype=DTYPE), cov).log_prob(flat(eps)))
    # the same Schur complement: the same factor, nothing factorised
    assert P.with_schur(P.schur).cholesky.L_S is P.cholesky.L_S


def test_with_schur_refuses_what_is_not_a_precision():
    P = ArrowheadPrecision(*make_blocks(4, 2, 3, seed=32))
    with pytest.raises(ValueError, match=r"S: expected shape \(3, 3\)"):
        P.with_schur(torch.eye(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="not positive definite"):
        P.with_schur(-torch.eye(3, dtype=DTYPE))


def test_detach_keeps_the_values_and_drops_the_graph():
    A, B, D = (t.requires_grad_() for t in make_blocks(4, 2, 3, seed=33))
    P = ArrowheadPrecision(A, B, D, repair="softabs")
    _ = P.M  # cached, then detached too
    Q = P.detach()
    for a, b in [
        (P.A, Q.A),
        (P.B, Q.B),
        (P.D, Q.D),
        (P.schur, Q.schur),
        (P.M, Q.M),
        *zip(P.cholesky, Q.cholesky),
    ]:
        assert torch.equal(a, b) and a.requires_grad and not b.requires_grad
    assert Q.report == P.report


# ---------------------------------------------------------------------------
# the Gaussian of a precision factor


def test_precision_cholesky_normal_matches_the_dense_normal():
    gen = torch.Generator().manual_seed(34)
    root = torch.randn(5, 3, 3, generator=gen, dtype=DTYPE)
    precision = root @ root.mT + torch.eye(3, dtype=DTYPE)
    L = torch.linalg.cholesky(precision).reshape(5, 1, 3, 3)
    loc = torch.randn(4, 5, 1, 3, generator=gen, dtype=DTYPE)  # particles left of the units
    q = PrecisionCholeskyNormal(loc, L)
    reference = MultivariateNormal(loc, precision_matrix=precision.reshape(5, 1, 3, 3))
    assert q.batch_shape == (4, 5, 1) and q.event_shape == (3,)
    x = torch.randn(2, 4, 5, 1, 3, generator=gen, dtype=DTYPE)
    assert_rel(q.log_prob(x), reference.log_prob(x))
    assert_rel(q.entropy(), reference.entropy())
    assert_rel(q.precision_matrix, reference.precision_matrix)
    assert_rel(q.covariance_matrix, reference.covariance_matrix)
    assert_rel(q.variance, reference.variance)
    # draws: loc + L⁻ᵀ ε, the particles folded into one solve
    eps = torch.randn(4, 5, 1, 3, generator=gen, dtype=DTYPE)
    expected = loc + torch.linalg.solve_triangular(
        L.mT.expand(4, 5, 1, 3, 3), eps.unsqueeze(-1), upper=True
    ).squeeze(-1)
    assert_rel(q.rsample_from_noise(eps), expected)
    # expanded (as under a plate): the same density, the factor not copied
    wide = PrecisionCholeskyNormal(loc[0], L).expand((6, 5, 1))
    assert wide.batch_shape == (6, 5, 1) and wide._unbroadcasted_precision_tril is L
    assert wide.rsample().shape == (6, 5, 1, 3) and wide.rsample((2,)).shape == (2, 6, 5, 1, 3)
    assert_rel(wide.log_prob(x[0, 0]), reference.log_prob(x[0, 0])[0].expand(6, 5, 1))
    with pytest.raises(ValueError, match=r"precision_tril: expected shape \(\.\.\., 3, 3\)"):
        PrecisionCholeskyNormal(loc, L[..., :2, :2])


# ---------------------------------------------------------------------------
# repair


@pytest.mark.parametrize("name", ["softabs", "softplus", "clip", "jitter"])
def test_repaired_blocks_are_the_documented_ones(name):
    N, k, p = 5, 2, 3
    A, B, D = make_blocks(N, k, p, seed=11, indefinite_units=range(N), indefinite_schur=True)
    P = ArrowheadPrecision(A, B, D, repair=name)
    repair = as_repair(name)
    D_rep = repair(0.5 * (D + D.mT)).matrix
    assert_rel(P.D, D_rep, tol=1e-14)
    BtDinvB = torch.einsum("nkp,nkl,nlq->pq", B, torch.linalg.inv(D_rep), B)
    S_rep = repair(A - BtDinvB).matrix
    assert_rel(P.schur, S_rep)
    assert_rel(P.A, S_rep + BtDinvB)
    assert torch.linalg.eigvalsh(P.to_dense()).min() > 0


@pytest.mark.parametrize("repair", [SoftAbs(), SoftplusFloor(), Clip(), Jitter()], ids=repr)
def test_repair_keeps_well_conditioned_pd(repair):
    A, B, D = make_blocks(4, 2, 3, seed=12)
    P = ArrowheadPrecision(A, B, D, repair=repair)
    assert_rel(P.to_dense(), arrowhead_to_dense(A, B, D), tol=1e-12)
    assert P.report == RepairReport(4, 0, 0, False, False)


def _report_blocks():
    """10 units; 1, 4, 7 indefinite; unit 2 PD with a tiny eigenvalue 0.002."""
    N, k, p = 10, 2, 3
    A, B, D = make_blocks(N, k, p, seed=13, indefinite_units=(1, 4, 7), b_scale=0.01)
    gen = torch.Generator().manual_seed(14)
    D[2] = _sym_with_eigvals(torch.tensor([0.002, 1.0], dtype=DTYPE), gen)
    return 10 * torch.eye(p, dtype=DTYPE), B, D


@pytest.mark.parametrize("name, repaired", [("softabs", 4), ("softplus", 4), ("clip", 3), ("jitter", 3)])
def test_report_counts(name, repaired):
    A, B, D = _report_blocks()
    report = ArrowheadPrecision(A, B, D, repair=name).report
    assert report == RepairReport(10, repaired, 3, False, False)
    assert f"{repaired} of 10 local blocks repaired (3 indefinite)" in str(report)
    assert "Schur complement kept" in str(report)
    indefinite = ArrowheadPrecision(-A, B, D, repair=name).report
    assert indefinite.schur_indefinite and indefinite.schur_repaired
    assert "Schur complement repaired (indefinite)" in str(indefinite)


def test_no_repair_no_report():
    A, B, D = make_blocks(3, 2, 2, seed=15)
    assert ArrowheadPrecision(A, B, D).report is None


# ---------------------------------------------------------------------------
# gradients of a repaired precision


def _directional_fd(fn, blocks, direction, h=1e-4):
    def at(s):
        return fn(*[x + s * h * dx for x, dx in zip(blocks, direction)])

    return (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h)


def _autograd_directional(fn, blocks, direction):
    leaves = [x.detach().clone().requires_grad_() for x in blocks]
    grads = torch.autograd.grad(fn(*leaves), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    return sum((g * dx).sum() for g, dx in zip(grads, direction))


def _gradient_setup(repair, seed):
    N, k, p = 4, 2, 3
    A, B, D = make_blocks(N, k, p, seed, indefinite_units=(0, 2), indefinite_schur=True)
    gen = torch.Generator().manual_seed(seed + 1)
    dA, dB, dD = (torch.randn(*x.shape, generator=gen, dtype=DTYPE) for x in (A, B, D))
    direction = (0.5 * (dA + dA.mT), dB, 0.5 * (dD + dD.mT))
    return (A, B, D), direction, (N, k, p)


def _assert_away_from_kinks(repair, A, B, D, margin=0.05):
    """FD needs every eigenvalue away from 0 and from the repair's floor."""
    P = ArrowheadPrecision(A, B, D, repair=repair)
    kinks = [0.0] + ([repair.floor] if hasattr(repair, "floor") else [])
    S_before = A - (P.A - P.schur)
    lam = torch.cat([torch.linalg.eigvalsh(D).flatten(), torch.linalg.eigvalsh(S_before)])
    for kink in kinks:
        assert (lam - kink).abs().min() > margin


GRAD_REPAIRS = [SoftAbs(), SoftplusFloor(floor=0.2), Clip(floor=0.2), Jitter(floor=0.2)]


@pytest.mark.parametrize("what", ["log_det", "log_prob", "sample"])
@pytest.mark.parametrize("repair", GRAD_REPAIRS, ids=repr)
def test_gradients_of_repaired_precision(repair, what):
    blocks, direction, (N, k, p) = _gradient_setup(repair, seed=16)
    _assert_away_from_kinks(repair, *blocks)
    x, loc = random_pair((2,), N, k, p, 17), random_pair((), N, k, p, 18)
    eps, w = random_pair((2,), N, k, p, 19), random_pair((2,), N, k, p, 20)

    def fn(A, B, D):
        P = ArrowheadPrecision(A, B, D, repair=repair)
        if what == "log_det":
            return P.log_det()
        if what == "log_prob":
            return P.log_prob(x, loc).sum()
        delta = P.sample(eps)
        return (delta[0] * w[0]).sum() + (delta[1] * w[1]).sum()

    fd = _directional_fd(fn, blocks, direction)
    ad = _autograd_directional(fn, blocks, direction)
    assert ad.item() == pytest.approx(fd.item(), rel=1e-7)


def test_gradients_without_repair():
    blocks = make_blocks(4, 2, 3, seed=21)
    gen = torch.Generator().manual_seed(22)
    dA, dB, dD = (torch.randn(*x.shape, generator=gen, dtype=DTYPE) for x in blocks)
    direction = (0.5 * (dA + dA.mT), dB, 0.5 * (dD + dD.mT))
    eps = random_pair((3,), 4, 2, 3, 23)

    def fn(A, B, D):
        P = ArrowheadPrecision(A, B, D)
        return P.log_det() + P.sample(eps)[1].pow(2).sum() + P.solve(eps)[0].sum()

    fd = _directional_fd(fn, blocks, direction)
    ad = _autograd_directional(fn, blocks, direction)
    assert ad.item() == pytest.approx(fd.item(), rel=1e-7)


# ---------------------------------------------------------------------------
# errors


def test_not_pd_without_repair_names_units():
    A, B, D = make_blocks(10, 2, 3, seed=24, indefinite_units=(1, 4, 7))
    with pytest.raises(ValueError, match=r"3 of 10 local blocks.*units 1, 4, 7\)") as err:
        ArrowheadPrecision(A, B, D)
    assert "repair='softabs'" in str(err.value)
    A, B, D = make_blocks(10, 2, 3, seed=25, indefinite_units=range(8))
    with pytest.raises(ValueError, match=r"8 of 10 local blocks.*units 0, 1, 2, 3, 4, \.\.\.\)"):
        ArrowheadPrecision(A, B, D)


def test_not_pd_schur_without_repair():
    A, B, D = make_blocks(5, 2, 3, seed=26)
    with pytest.raises(ValueError, match="Schur complement.*repair='softabs'"):
        ArrowheadPrecision(-torch.eye(3, dtype=DTYPE), B, D)


def test_bad_shapes_and_types():
    A, B, D = make_blocks(5, 2, 3, seed=27)
    bad = [
        ((A[:, :2], B, D), r"A: expected a square \(p, p\) matrix, given shape \(3, 2\)"),
        ((A, B[..., :2], D), r"B: expected shape \(N, k, p\) = \(N, k, 3\).*given \(5, 2, 2\)"),
        ((A, B, D[:4]), r"D: expected shape \(N, k, k\) = \(5, 2, 2\).*given \(4, 2, 2\)"),
        ((A, B, torch.ones(5, 3, 3, dtype=DTYPE)), r"D: expected shape .*given \(5, 3, 3\)"),
        ((A, B[0], D), r"B: expected a 3-dimensional tensor, given shape \(2, 3\)"),
        ((A, B, D.float()), "D: expected dtype torch.float64"),
        ((A.numpy(), B, D), "A: expected a torch.Tensor"),
        ((A, B.int(), D.int()), "B: expected dtype"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            ArrowheadPrecision(*args)
    nan_D = D.clone()
    nan_D[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="D: contains non-finite"):
        ArrowheadPrecision(A, B, nan_D)


def test_bad_vectors_and_repair_name():
    A, B, D = make_blocks(5, 2, 3, seed=28)
    P = ArrowheadPrecision(A, B, D)
    with pytest.raises(ValueError, match=r"b\[1\] \(y part\): expected shape \(\.\.\., 5, 2\)"):
        P.solve((torch.zeros(3, dtype=DTYPE), torch.zeros(5, 3, dtype=DTYPE)))
    with pytest.raises(ValueError, match=r"eps\[0\] \(theta part\): expected shape \(\.\.\., 3\)"):
        P.sample((torch.zeros(2, dtype=DTYPE), torch.zeros(5, 2, dtype=DTYPE)))
    with pytest.raises(ValueError, match="x: expected a pair"):
        P.log_prob(torch.zeros(13, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"delta_theta: expected shape \(\.\.\., 3\)"):
        P.conditional_local(torch.zeros(4, dtype=DTYPE))
    with pytest.raises(ValueError, match="unknown repair 'abs'.*'softabs'"):
        ArrowheadPrecision(A, B, D, repair="abs")


def test_float32():
    A, B, D = (x.float() for x in make_blocks(4, 2, 3, seed=29, indefinite_units=(1,)))
    P = ArrowheadPrecision(A, B, D, repair="softabs")
    assert P.dtype == torch.float32 and P.log_det().dtype == torch.float32
    eps = (torch.randn(2, 3), torch.randn(2, 4, 2))
    assert torch.isfinite(P.log_prob(P.sample(eps))).all()
    expected = torch.linalg.slogdet(P.to_dense().double())[1]
    assert P.log_det().item() == pytest.approx(expected.item(), rel=1e-5)


def test_log_prob_constant():
    """Standard normal: log N(0; 0, I) = −d/2 log 2π."""
    A, B, D = torch.eye(2), torch.zeros(3, 1, 2), torch.ones(3, 1, 1)
    P = ArrowheadPrecision(A.double(), B.double(), D.double())
    zero = (torch.zeros(2, dtype=DTYPE), torch.zeros(3, 1, dtype=DTYPE))
    assert P.log_prob(zero, zero).item() == pytest.approx(-2.5 * math.log(2 * math.pi))
