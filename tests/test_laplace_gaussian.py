"""The Gaussian a Laplace guide publishes per call (curvi.posterior.LaplaceGaussian,
read with curvi.guides.laplace_gaussian): against a dense reference built from
its blocks (S, M, D), and sampled from its own factors."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from models import make_linear_gaussian, make_poisson_vector
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.messenger import Messenger

from curvi.arrowhead import ArrowheadPrecision, arrowhead_to_dense
from curvi.guides import AmortizedLaplaceGuide, LaplaceGuide, laplace_gaussian
from curvi.posterior import LaplaceGaussian

TOL = dict(rtol=1e-10, atol=1e-10)


def dense_reference(q):
    """The precision of q(θ) q(y | θ) from S, M, D alone:
    [[S + Σ MᵢᵀDᵢMᵢ, (DM)ᵀ], [DM, D]]."""
    S, M, D = q.global_precision, q.M, q.local_precision
    DM = D @ M
    return arrowhead_to_dense(S + torch.einsum("nkp,nkq->pq", M, DM), DM, D)


def flat(theta, y):
    return torch.cat([theta, y.reshape(y.shape[:-2] + (-1,))], -1)


def configured(name):
    """A guide after a few steps, its model and args."""
    if name == "subsampled":
        model, args, plate, _ = make_linear_gaussian(num_groups=12, subsample_size=4)
        guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    else:
        model, args, plate = make_poisson_vector()
        kwargs = {"global_precision": "marginal"} if name == "marginal" else {}
        guide = (LaplaceGuide if name == "laplace" else AmortizedLaplaceGuide)(
            model, unit_plate=plate, init_to_mode=False, **kwargs
        )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(*args)
    return model, guide, args


CONFIGS = ["laplace", "amortized", "marginal", "subsampled"]


class RecordedNoise(Messenger):
    """Draws each site that can from recorded standard-normal noise."""

    def __init__(self):
        super().__init__()
        self.eps = {}

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["value"] is None and hasattr(fn, "rsample_from_noise"):
            self.eps[msg["name"]] = torch.randn(fn.batch_shape + fn.event_shape)
            msg["value"] = fn.rsample_from_noise(self.eps[msg["name"]])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("particles", [None, 4])
def test_published_gaussian_is_the_dense_gaussian_sampled(name, particles):
    model, guide, args = configured(name)
    run = guide if particles is None else pyro.plate("particles", particles, dim=-3)(guide)
    noise = RecordedNoise()
    with noise:
        trace = poutine.trace(run).get_trace(*args)
    q = laplace_gaussian(trace)
    global_site = trace.nodes[f"_{guide._pyro_name}_global"]
    local_site = trace.nodes[f"_{guide._pyro_name}_local"]
    assert global_site["infer"]["laplace_gaussian"] is q and isinstance(q, LaplaceGaussian)
    p, (n, k) = q.theta_hat.shape[0], q.y_hat.shape
    assert q.subsampled == (name == "subsampled") and (n == 4) == q.subsampled
    assert q.global_precision.requires_grad  # with its graph

    # the sites' draws are the arrowhead's from the same standard-normal noise
    K = 1 if particles is None else particles
    eps_theta = noise.eps[global_site["name"]].reshape(K, p)
    eps_y = noise.eps[local_site["name"]].reshape(K, n, k)
    theta = global_site["value"].reshape(K, p)
    y = local_site["value"].reshape(K, n, k)
    sample = q.sample((eps_theta, eps_y))
    torch.testing.assert_close(sample[0], theta, **TOL)
    torch.testing.assert_close(sample[1], y, **TOL)

    # density, entropy, marginals: the dense Gaussian of the blocks S, M, D
    dense = dense_reference(q)
    torch.testing.assert_close(q.precision.to_dense(), dense, **TOL)
    reference = torch.distributions.MultivariateNormal(flat(*q.mean), precision_matrix=dense)
    log_q = q.log_prob((theta, y))
    torch.testing.assert_close(log_q, reference.log_prob(flat(theta, y)), **TOL)
    sites = global_site["fn"].log_prob(global_site["value"]).reshape(K) + local_site["fn"].log_prob(
        local_site["value"]
    ).reshape(K, n).sum(-1)
    torch.testing.assert_close(log_q, sites, **TOL)  # the sites' own densities
    torch.testing.assert_close(q.entropy(), reference.entropy(), **TOL)
    cov = torch.linalg.inv(dense)
    torch.testing.assert_close(flat(*q.marginal_variances()), cov.diagonal(), **TOL)
    d = p + n * k
    eye = torch.eye(d)
    T = flat(*q.sample((eye[:, :p], eye[:, p:].reshape(d, n, k)))) - flat(*q.mean)
    torch.testing.assert_close(T.T @ T, cov, **TOL)
    cond = q.conditional_local(theta)
    torch.testing.assert_close(
        cond.mean, q.y_hat - torch.einsum("nkp,bp->bnk", q.M, theta - q.theta_hat), **TOL
    )
    torch.testing.assert_close(cond.precision_matrix[0], q.local_precision, **TOL)

    # S is q(θ)'s precision as configured
    if name == "subsampled":
        torch.testing.assert_close(q.global_precision, guide.running_schur, **TOL)
        assert guide.running_count > 1
    elif name == "marginal":
        # the joint Schur complement here plus the marginal correction of the
        # last refresh, repaired (at a refresh: the Laplace marginal's
        # curvature, tests/test_guides.py)
        P = guide._precision(guide.view, q.theta_hat.detach(), q.y_hat.detach(), None)
        expected = guide.repair(P.schur + guide.marginal_correction).matrix
        torch.testing.assert_close(q.global_precision, expected, **TOL)
    else:
        assert q.global_precision is q.precision.schur


class FactorisationCount(Messenger):
    """Counts matrix factorisations from the first Laplace site's sampling
    to the last one's, and inside ``with counter.counting():``."""

    NAMES = (
        "cholesky",
        "cholesky_ex",
        "eigh",
        "eigvalsh",
        "inv",
        "inv_ex",
        "solve",
        "solve_ex",
        "lu_factor",
        "lu_factor_ex",
        "ldl_factor",
        "ldl_factor_ex",
    )

    def __init__(self, monkeypatch, first, last):
        super().__init__()
        self.count, self.active, self.first, self.last = 0, False, first, last
        for name in self.NAMES:
            real = getattr(torch.linalg, name)
            monkeypatch.setattr(torch.linalg, name, self._counted(real))
        monkeypatch.setattr(torch, "cholesky_inverse", torch.cholesky_inverse)  # from a factor: fine

    def _counted(self, real):
        def counted(*args, **kwargs):
            self.count += int(self.active)
            return real(*args, **kwargs)

        return counted

    def _pyro_sample(self, msg):
        if msg["name"] == self.first:
            self.active = True

    def _pyro_post_sample(self, msg):
        if msg["name"] == self.last:
            self.active = False


@pytest.mark.parametrize("name", ["laplace", "amortized"])
def test_sampling_and_densities_factorise_nothing_again(name, monkeypatch):
    """The sites draw from the factors ArrowheadPrecision computed (no
    MultivariateNormal(precision_matrix=...)), and their densities and the
    Gaussian's need no factorisation either."""
    model, guide, args = configured(name)
    first, last = f"_{guide._pyro_name}_global", f"_{guide._pyro_name}_local"
    counter = FactorisationCount(monkeypatch, first, last)
    run = pyro.plate("particles", 4, dim=-3)(guide)
    with counter:
        trace = poutine.trace(run).get_trace(*args)
    assert counter.count == 0 and not counter.active
    counter.active = True
    trace.compute_log_prob()
    q = laplace_gaussian(trace)
    q.log_prob(
        (trace.nodes[first]["value"].reshape(4, -1), trace.nodes[last]["value"].reshape(4, *q.y_hat.shape))
    )
    q.entropy()
    assert counter.count == 0
    # the counter does count: building the precision factorises
    ArrowheadPrecision(q.precision.A.detach(), q.precision.B.detach(), q.precision.D.detach())
    assert counter.count >= 2


def test_laplace_gaussian_of_other_traces():
    model, args, _ = make_poisson_vector()
    guide = AutoNormal(model)
    assert laplace_gaussian(poutine.trace(guide).get_trace(*args)) is None
    trace = poutine.Trace()
    for name in ("a", "b"):
        trace.add_node(name, type="sample", infer={"laplace_gaussian": object()})
    with pytest.raises(ValueError, match="Gaussians of 2 Laplace guides"):
        laplace_gaussian(trace)


def test_read_outs_use_the_same_gaussian():
    """get_posterior's LaplacePosterior holds a LaplaceGaussian over all units,
    whose marginal sds are the quantiles' and equal the published one's
    when the call saw every unit."""
    model, guide, args = configured("amortized")
    trace = poutine.trace(guide).get_trace(*args)
    published = laplace_gaussian(trace)
    post = guide.laplace_posterior(*args)
    assert isinstance(post.gaussian, LaplaceGaussian)
    for a, b in zip(post.gaussian.marginal_variances(), published.marginal_variances()):
        torch.testing.assert_close(a, b.detach(), **TOL)
    sd_theta, _ = post.marginal_sd()
    torch.testing.assert_close(sd_theta**2, published.marginal_variances()[0].detach(), **TOL)


def test_bad_shapes():
    q = laplace_gaussian(poutine.trace(configured("amortized")[1]).get_trace(*make_poisson_vector()[1]))
    with pytest.raises(ValueError, match="but the mean has shapes"):
        LaplaceGaussian(q.theta_hat[:1], q.y_hat, q.precision)
