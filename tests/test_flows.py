"""curvi.flows: exact Hessians of flow log densities against dense autodiff
(``torch.autograd.functional.hessian``, float64, 1e-8) and finite differences."""

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
import torch.distributions.transforms as TT
from fd import central_gradient
from pyro.nn import AutoRegressiveNN, DenseNN

import curvi.flows as flows
from curvi import log_density_hessian

DIMS = [2, 10, 50]
KINDS = ["affine", "spline", "planar", "radial", "sylvester", "composed", "composed_implicit"]
NUM_POINTS = 3
TOL = dict(rtol=1e-8, atol=1e-8)


def small_hidden(d):
    return [max(4, d // 2)]


def affine(d, **kwargs):
    s = d // 2
    return T.AffineCoupling(s, DenseNN(s, small_hidden(d), [d - s, d - s], **kwargs))


def spline(d):
    layer = T.spline_coupling(d, hidden_dims=small_hidden(d), count_bins=4)
    with torch.no_grad():  # a tame spline: curvature of order one
        for p in layer.parameters():
            p.mul_(0.3)
    return layer


def make_flow(kind, d, seed=0):
    torch.manual_seed(seed)
    perm = lambda: T.Permute(torch.randperm(d))  # noqa: E731
    layers = {
        "affine": lambda: [affine(d)],
        "spline": lambda: [spline(d)],
        "planar": lambda: [T.Planar(d), T.Planar(d)],
        "radial": lambda: [T.Radial(d), T.Radial(d)],
        # no inverse and no closed form in curvi: generic Newton + implicit differentiation
        "sylvester": lambda: [T.Sylvester(d, count_transforms=2), T.Planar(d)],
        "composed": lambda: [affine(d), perm(), spline(d), perm(), affine(d)],
        "composed_implicit": lambda: [affine(d), perm(), T.Planar(d), spline(d), T.Radial(d)],
    }[kind]()
    base = dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1)
    return dist.TransformedDistribution(base, layers)


def points(q, n=NUM_POINTS, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return q.sample((n,)).detach().clone()  # a fresh tensor: no transform cache hits


def dense_reference(fn, x):
    """Per point, the dense reference of the issue: torch.autograd.functional.hessian."""
    return torch.stack([torch.autograd.functional.hessian(fn, xi) for xi in x])


def base_log_density(q):
    """ω ↦ log q(f(ω)) = log q₀(ω) − Σ log|det J_f|, forward only."""

    def fn(w):
        lp, x = q.base_dist.log_prob(w), w
        for t in q.transforms:
            y = t(x)
            lp = lp - t.log_abs_det_jacobian(x, y)
            x = y
        return lp

    return fn


def push_forward(q):
    def fn(w):
        for t in q.transforms:
            w = t(w)
        return w

    return fn


def has_inverse(kind):
    return kind in ("affine", "spline", "composed")


# ------------------------------------------------------ against dense autodiff
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_matches_dense_autodiff(kind, d):
    q = make_flow(kind, d)
    z = points(q)
    out = log_density_hessian(q, z, full_output=True)
    assert out.hessian.shape == (NUM_POINTS, d, d)
    torch.testing.assert_close(out.hessian, out.hessian.transpose(-1, -2), rtol=0, atol=1e-12)
    if has_inverse(kind):
        torch.testing.assert_close(out.hessian, dense_reference(q.log_prob, z), **TOL)
        torch.testing.assert_close(out.log_prob, q.log_prob(z), **TOL)
    else:
        # no inverse to differentiate: check the identity that defines the Hessian
        # in z, ∇²_ω log q(f(ω)) = Jᵀ H_z J + Σ_k (∇_z log q)_k ∇²_ω f_k, against
        # dense autodiff of forward-only functions of ω
        f, phi = push_forward(q), base_log_density(q)
        torch.testing.assert_close(f(out.base), z, rtol=0, atol=1e-12)
        for w, H, lam in zip(out.base, out.hessian, out.grad):
            J = torch.autograd.functional.jacobian(f, w)
            curvature = torch.autograd.functional.hessian(lambda v: (lam * f(v)).sum(), w)  # noqa: B023
            torch.testing.assert_close(
                J.T @ H @ J + curvature, torch.autograd.functional.hessian(phi, w), **TOL
            )
            torch.testing.assert_close(J.T @ lam, torch.autograd.functional.jacobian(phi, w), **TOL)
        torch.testing.assert_close(out.log_prob, phi(out.base), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_base_coordinates_match_dense_autodiff(kind):
    d = 10
    q = make_flow(kind, d)
    w = torch.randn(NUM_POINTS, d)
    out = log_density_hessian(q, w, coordinates="base", full_output=True)
    phi = base_log_density(q)
    torch.testing.assert_close(out.hessian, dense_reference(phi, w), **TOL)
    torch.testing.assert_close(out.log_prob, phi(w), **TOL)
    assert out.base is w or torch.equal(out.base, w)


# --------------------------------------------------------- finite differences
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_matches_finite_differences(kind):
    d = 10
    q = make_flow(kind, d)
    z = points(q, n=1)[0]

    def grad(v):
        return log_density_hessian(q, v, full_output=True).grad

    def log_prob(v):
        return log_density_hessian(q, v, full_output=True).log_prob

    out = log_density_hessian(q, z, full_output=True)
    H_fd = torch.stack([(grad(z + 1e-5 * e) - grad(z - 1e-5 * e)) / 2e-5 for e in torch.eye(d)])
    torch.testing.assert_close(out.hessian, H_fd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.grad, central_gradient(log_prob, z), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------- structure handled
def _other_layers(d):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2 * (d - 2))

        def forward(self, x):
            out = torch.tanh(self.lin(x))
            return out[..., : d - 2], out[..., d - 2 :]

    return {
        "tanh two-layer hypernet": [
            T.AffineCoupling(2, DenseNN(2, [7, 6], [d - 2, d - 2], nonlinearity=torch.nn.Tanh()))
        ],
        "softplus hypernet, inverted": [
            T.AffineCoupling(3, DenseNN(3, [7], [d - 3, d - 3], nonlinearity=torch.nn.Softplus())).inv
        ],
        "custom hypernet": [T.AffineCoupling(2, Net())],
        "element-wise": [
            T.Spline(d),
            TT.AffineTransform(torch.randn(d), torch.rand(d) + 0.5),
            TT.ExpTransform().inv,
        ],
        "compose": [TT.ComposeTransform([T.Permute(torch.randperm(d)), affine(d)])],
        "autoregressive (generic)": [T.AffineAutoregressive(AutoRegressiveNN(d, [8]))],
        "householder (generic)": [T.Householder(d, count_transforms=2)],
        "planar, inverted": [T.Planar(d).inv],
    }


@pytest.mark.parametrize("name", list(_other_layers(5)))
def test_other_layers_match_dense_autodiff(name):
    d = 5
    torch.manual_seed(0)
    base = dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1)
    q = dist.TransformedDistribution(base, _other_layers(d)[name])
    z = torch.rand(4, d) + 0.2 if name == "element-wise" else 0.7 * torch.randn(4, d)
    torch.testing.assert_close(log_density_hessian(q, z), dense_reference(q.log_prob, z), **TOL)


def test_stacked_rows_fallback_agrees(monkeypatch):
    q = make_flow("composed_implicit", 6)
    z = points(q)
    batched = log_density_hessian(q, z)
    monkeypatch.setattr(flows, "_BATCHED_ROWS", False)
    torch.testing.assert_close(log_density_hessian(q, z), batched, rtol=1e-10, atol=1e-10)


def test_works_after_torch_func_cached_the_inverse_permutation():
    # Pyro's Permute caches inv_permutation lazily; computed inside a torch.func
    # transform it escapes as a wrapped tensor and breaks the next torch.func call.
    q = make_flow("composed", 4)
    z = points(q)
    with pyro.validation_enabled(False):
        torch.func.hessian(q.log_prob)(z[0])
    torch.testing.assert_close(log_density_hessian(q, z), dense_reference(q.log_prob, z), **TOL)


def test_distributions_without_transforms():
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    mvn = dist.MultivariateNormal(torch.zeros(2), cov)
    H = log_density_hessian(mvn, torch.randn(3, 2))
    torch.testing.assert_close(H, -torch.linalg.inv(cov).expand(3, 2, 2), **TOL)
    H = log_density_hessian(dist.Normal(torch.zeros(3), 2.0), torch.randn(3))  # event shape ()
    torch.testing.assert_close(H, torch.full((3, 1, 1), -0.25))
    gamma = dist.Gamma(torch.tensor(3.0), 2.0)
    x = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(log_density_hessian(gamma, x), (-2.0 / x**2).reshape(2, 1, 1))


def test_batch_shapes_broadcast():
    d = 4
    q = make_flow("composed_implicit", d)
    assert log_density_hessian(q, torch.randn(d)).shape == (d, d)
    z = torch.randn(2, 3, d)
    H = log_density_hessian(q, z)
    assert H.shape == (2, 3, d, d)
    torch.testing.assert_close(H.reshape(6, d, d), log_density_hessian(q, z.reshape(6, d)))
    base = dist.Normal(torch.zeros(3, d), torch.ones(3, d)).to_event(1)  # batch shape (3,)
    qb = dist.TransformedDistribution(base, [affine(d)])
    assert log_density_hessian(qb, torch.randn(d)).shape == (3, d, d)
    assert log_density_hessian(qb, torch.randn(2, 1, d)).shape == (2, 3, d, d)


def test_float32():
    d = 4
    q = make_flow("composed_implicit", d)
    q32 = dist.TransformedDistribution(  # the same flow, its own copy in float32
        dist.Normal(torch.zeros(d, dtype=torch.float32), torch.ones(d, dtype=torch.float32)).to_event(1),
        [
            t.float() if isinstance(t, torch.nn.Module) else t
            for t in make_flow("composed_implicit", d).transforms
        ],
    )
    z = points(q)
    H32 = log_density_hessian(q32, z.float())
    assert H32.dtype == torch.float32
    torch.testing.assert_close(H32.double(), log_density_hessian(q, z), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------- errors
def test_errors():
    q = make_flow("composed_implicit", 4)
    with pytest.raises(TypeError, match="log_prob"):
        log_density_hessian(object(), torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        log_density_hessian(q, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        log_density_hessian(q, [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"event shape \(4,\)"):
        log_density_hessian(q, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="coordinates"):
        log_density_hessian(q, torch.zeros(4), coordinates="omega")
    with pytest.raises(ValueError, match="needs a TransformedDistribution"):
        log_density_hessian(dist.Normal(0.0, 1.0), torch.zeros(3), coordinates="base")
    with pytest.raises(ValueError, match=r"Newton's method did not invert layer 2 \(Planar\)"):
        log_density_hessian(q, torch.ones(4), max_iter=0)
    with pytest.raises(ValueError, match=r"Newton's method did not invert layer 0 \(Sylvester\)"):
        sylvester = dist.TransformedDistribution(q.base_dist, [T.Sylvester(4)])
        log_density_hessian(sylvester, torch.ones(4), max_iter=0)
    sigmoid = dist.TransformedDistribution(dist.Normal(0.0, 1.0), [TT.SigmoidTransform()], validate_args=True)
    with pytest.raises(ValueError, match="support"):
        log_density_hessian(sigmoid, torch.tensor([0.5, 1.5]))
