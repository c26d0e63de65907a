"""The Bayesian learning rule for Gaussian guides (curvi.NaturalGradient)."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from curvi import NaturalGradient, fit
from models import make_linear_gaussian


def svi_for(model, guide, loss):
    return SVI(model, guide, pyro.optim.SGD({"lr": 1.0}), loss)


def test_one_step_lands_on_exact_posterior():
    """Linear-Gaussian model, full-covariance guide, exact expectations,
    step size 1: one step gives the exact posterior mean and precision."""
    model, args, _, exact = make_linear_gaussian()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    guide(*args)
    svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=0)).step(*args)
    q = guide.get_posterior()  # latent order (mu, b, u) = the exact solution's
    assert torch.allclose(q.mean, exact["mean"], atol=1e-8, rtol=0)
    assert torch.allclose(q.precision_matrix, exact["precision"], atol=1e-8, rtol=0)
    # with one sample the Hessian is still exact (constant), the mean not
    svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=1)).step(*args)
    assert torch.allclose(guide.get_posterior().precision_matrix, exact["precision"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("cls", [AutoNormal, AutoDiagonalNormal])
def test_diagonal_guides_reach_mean_field_optimum(cls):
    """Mean field on a Gaussian model: the optimum has the exact means and
    precisions the diagonal of the exact precision; the rule reaches it."""
    model, args, _, exact = make_linear_gaussian()
    pyro.set_rng_seed(0)
    guide = cls(model)
    guide(*args)
    svi = svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=0))
    for _ in range(300):
        svi.step(*args)
    median = guide.median()
    values = torch.cat([median["mu"].reshape(-1), median["b"].reshape(-1), median["u"].reshape(-1)])
    assert torch.allclose(values, exact["mean"], atol=1e-8, rtol=0)
    if cls is AutoNormal:
        scales = torch.cat([guide.scales.mu.reshape(-1), guide.scales.b.reshape(-1), guide.scales.u.reshape(-1)])
    else:
        scales = guide.scale
    assert torch.allclose(scales ** -2, exact["precision"].diagonal(), atol=1e-8, rtol=0)


def logistic(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    obs = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -0.5, 0.3])), generator=g)

    def model(x, obs):
        w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
        with pyro.plate("data", len(obs)):
            pyro.sample("obs", dist.Bernoulli(logits=(w * x).sum(-1)), obs=obs)

    return model, (x, obs)


def test_logistic_reaches_adams_optimum():
    """On logistic regression the rule converges to the ELBO optimum that a
    long Adam run finds (means, covariance and ELBO)."""
    model, args = logistic()
    pyro.set_rng_seed(0)
    adam_guide = AutoMultivariateNormal(model)
    fit(model, adam_guide, *args, steps=3000, tol=None, progress=False,
        optim=pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.999}),
        loss=Trace_ELBO(num_particles=16, vectorize_particles=True))
    pyro.set_rng_seed(1)
    guide = AutoMultivariateNormal(model)
    guide(*args)
    svi = svi_for(model, guide, NaturalGradient(lr=0.5, num_samples=500))
    for _ in range(30):
        svi.step(*args)
    a, b = adam_guide.get_posterior(), guide.get_posterior()
    assert torch.allclose(a.mean, b.mean, atol=0.02)
    assert torch.allclose(a.covariance_matrix, b.covariance_matrix, atol=0.01)
    elbo = Trace_ELBO(num_particles=20000, vectorize_particles=True)
    pyro.set_rng_seed(2)
    ea = -elbo.loss(model, adam_guide, *args)
    pyro.set_rng_seed(2)
    eb = -elbo.loss(model, guide, *args)
    assert abs(ea - eb) < 0.02


def test_correction_keeps_precision_positive_definite():
    """A Cauchy likelihood far in its tails: the expected curvature is
    negative, the plain rule would give an indefinite precision, the improved
    rule does not."""
    obs = torch.tensor([-30.0, 30.0])

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 100.0))
        with pyro.plate("data", 2):
            pyro.sample("obs", dist.Cauchy(mu, 1.0), obs=obs)

    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model, init_scale=0.01)
    guide(obs)
    loss = NaturalGradient(lr=1.0, num_samples=0)
    svi_for(model, guide, loss).step(obs)
    assert loss.num_corrected == 1
    assert torch.linalg.eigvalsh(guide.get_posterior().precision_matrix).min() > 0
    with pytest.raises(ValueError, match="not positive definite"):
        svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=0, correction="never")).step(obs)


def test_fit_runs_natural_gradient():
    model, args = logistic()
    guide = AutoNormal(model)
    result = fit(model, guide, *args, steps=20, progress=False, optim=pyro.optim.SGD({"lr": 1.0}),
                 loss=NaturalGradient(lr=0.5, num_samples=4))
    assert len(result.elbo) == 20 and all(math.isfinite(v) for v in result.elbo)


def test_errors():
    for kwargs, match in [(dict(lr=0.0), "lr"), (dict(lr=1.5), "lr"), (dict(num_samples=-1), "num_samples"),
                          (dict(damping=-1.0), "damping"), (dict(correction="x"), "correction"),
                          (dict(curvature="fisher"), "curvature"), (dict(antithetic=1), "antithetic")]:
        with pytest.raises(ValueError, match=match):
            NaturalGradient(**kwargs)
    model, args = logistic()
    guide = AutoDelta(model)
    with pytest.raises(ValueError, match="AutoDelta"):
        svi_for(model, guide, NaturalGradient()).step(*args)
    with pytest.raises(NotImplementedError, match="loss_and_grads"):
        NaturalGradient().differentiable_loss(model, guide, *args)


def test_antithetic_pair_lands_on_exact_posterior():
    """Two mirrored draws m ± δ average the gradient of a quadratic log p to
    its value at the mean: one step with lr 1 is exact; two independent
    draws are not."""
    model, args, _, exact = make_linear_gaussian()
    for antithetic in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMultivariateNormal(model)
        guide(*args)
        svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=2, antithetic=antithetic)).step(*args)
        q = guide.get_posterior()
        assert torch.allclose(q.precision_matrix, exact["precision"], atol=1e-8, rtol=0)
        error = (q.mean - exact["mean"]).abs().max()
        assert error < 1e-8 if antithetic else error > 1e-3


def _expectations(loss, model, guide, args, seed):
    layout = loss._layout(model, guide)
    with torch.no_grad():
        mean, precision = _adapter(guide).natural(layout)
    densities = loss._densities(model, guide, layout, args, {}, mean)
    pyro.set_rng_seed(seed)
    return densities, loss._expectations(densities, mean, precision, False)[:2]


def _adapter(guide):
    from curvi.natural_gradient import _adapter as adapter

    return adapter(guide)


def test_draws_are_evaluated_in_one_vectorised_run():
    """The batched gradients and Hessians of the draws equal the one-by-one
    ones; a model that does not broadcast over the draws falls back to those."""
    model, args = logistic()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    guide(*args)
    loss = NaturalGradient(num_samples=6)
    (_, batched), (grad, hess) = _expectations(loss, model, guide, args, seed=3)
    assert batched is not None
    loss._layouts[guide]["batched_ok"] = False
    (_, none), (grad1, hess1) = _expectations(loss, model, guide, args, seed=3)
    assert none is None
    assert torch.allclose(grad, grad1, atol=1e-10) and torch.allclose(hess, hess1, atol=1e-10)

    x, obs = args

    def matmul_model(x, obs):  # x @ w does not broadcast over a batch of w
        w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
        with pyro.plate("data", len(obs)):
            pyro.sample("obs", dist.Bernoulli(logits=x @ w), obs=obs)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(matmul_model)
    guide(*args)
    loss = NaturalGradient(num_samples=6)
    (_, batched), (grad2, hess2) = _expectations(loss, matmul_model, guide, args, seed=3)
    assert batched is None and loss._layouts[guide]["batched_ok"] is False
    assert torch.allclose(grad2, grad1, atol=1e-10) and torch.allclose(hess2, hess1, atol=1e-10)


def test_gradient_curvature_is_unbiased():
    """The Bonnet–Price estimate S (x − m) ∇ log pᵀ averages to the expected
    Hessian: many draws of each agree to Monte Carlo error."""
    model, args = logistic()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model, init_scale=0.5)
    guide(*args)
    estimates = {}
    for curvature in ("hessian", "gradient"):
        loss = NaturalGradient(num_samples=20000, curvature=curvature)
        _, (_, estimates[curvature]) = _expectations(loss, model, guide, args, seed=1)
    scale = estimates["hessian"].abs().max()
    assert (estimates["gradient"] - estimates["hessian"]).abs().max() < 0.03 * scale


def test_gradient_curvature_converges_on_gaussian_model():
    """With the gradient-only curvature and a small step size, the rule
    still reaches the exact posterior of a Gaussian model (to Monte Carlo
    error), keeping the precision positive definite on the way."""
    model, args, _, exact = make_linear_gaussian()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    guide(*args)
    svi = svi_for(model, guide, NaturalGradient(lr=0.05, num_samples=16, curvature="gradient"))
    for _ in range(300):
        svi.step(*args)
    q = guide.get_posterior()
    sds = exact["precision"].inverse().diagonal().sqrt()
    assert ((q.mean - exact["mean"]).abs() / sds).max() < 0.1
    ratio = q.covariance_matrix.diagonal().sqrt() / sds
    assert (ratio - 1).abs().max() < 0.15, ratio


def test_returned_loss_is_the_elbo_from_the_draws():
    """At the exact posterior of a Gaussian model the ELBO is the log
    evidence; the loss returned from the step's draws (log p averaged over
    them plus q's entropy, no extra model run) estimates minus it."""
    model, args, _, exact = make_linear_gaussian()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    guide(*args)
    svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=0)).step(*args)  # exact posterior
    loss = NaturalGradient(lr=0.5, num_samples=4000).loss_and_grads(model, guide, *args)
    assert abs(loss + exact["log_evidence"].item()) < 0.15
    for cls in (AutoNormal, AutoDiagonalNormal):  # the diagonal entropy, against Trace_ELBO
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = cls(model)
        guide(*args)
        ours = NaturalGradient(num_samples=4000).loss_and_grads(model, guide, *args)
        theirs = Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(model, guide, *args)
        assert abs(ours - theirs) < 0.05 * abs(theirs)
