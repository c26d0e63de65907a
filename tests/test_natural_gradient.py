"""The Bayesian learning rule for Gaussian guides (curvi.NaturalGradient)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from models import make_linear_gaussian
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from curvi import NaturalGradient, fit


def svi_for(model, guide, optim):
    """The new usage: the optimiser and its own loss."""
    return SVI(model, guide, optim, optim.loss)


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
        scales = torch.cat(
            [guide.scales.mu.reshape(-1), guide.scales.b.reshape(-1), guide.scales.u.reshape(-1)]
        )
    else:
        scales = guide.scale
    assert torch.allclose(scales**-2, exact["precision"].diagonal(), atol=1e-8, rtol=0)


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
    fit(
        model,
        adam_guide,
        *args,
        steps=3000,
        tol=None,
        progress=False,
        optim=pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.999}),
        loss=Trace_ELBO(num_particles=16, vectorize_particles=True),
    )
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
    optim = NaturalGradient(lr=1.0, num_samples=0)
    svi_for(model, guide, optim).step(obs)
    assert optim.num_corrected == 1
    assert torch.linalg.eigvalsh(guide.get_posterior().precision_matrix).min() > 0
    with pytest.raises(ValueError, match="not positive definite"):
        svi_for(model, guide, NaturalGradient(lr=1.0, num_samples=0, correction="never")).step(obs)


def test_fit_runs_natural_gradient():
    model, args = logistic()
    guide = AutoNormal(model)
    optim = NaturalGradient(lr=0.5, num_samples=4)
    result = fit(model, guide, *args, steps=20, progress=False, optim=optim, loss=optim.loss)
    assert len(result.elbo) == 20 and all(math.isfinite(v) for v in result.elbo)


def test_errors():
    """A wrong value is a ValueError, a wrong type a TypeError, each naming
    the argument."""
    for kwargs, match in [
        (dict(lr=0.0), "lr"),
        (dict(lr=1.5), "lr"),
        (dict(num_samples=-1), "num_samples"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=math.inf), "damping"),
        (dict(correction="x"), "correction"),
        (dict(curvature="fisher"), "curvature"),
        (dict(elbo_particles=0), "elbo_particles"),
    ]:
        with pytest.raises(ValueError, match=match):
            NaturalGradient(**kwargs)
    for kwargs, match in [
        (dict(antithetic=1), "antithetic"),
        (dict(lr="0.5"), "lr"),
        (dict(lr=True), "lr"),
        (dict(num_samples=2.0), "num_samples"),
        (dict(curvature=None), "curvature"),
        (dict(correction=1), "correction"),
        (dict(damping="0"), "damping"),
    ]:
        with pytest.raises(TypeError, match=match):
            NaturalGradient(**kwargs)
    model, args = logistic()
    guide = AutoDelta(model)
    with pytest.raises(TypeError, match="AutoDelta"):
        svi_for(model, guide, NaturalGradient()).step(*args)
    with pytest.raises(NotImplementedError, match="loss_and_grads"):
        NaturalGradient().loss.differentiable_loss(model, guide, *args)
    with pytest.raises(TypeError, match="get_state"):
        NaturalGradient().set_state([1])


def test_old_usage_fails_with_the_new_usage_in_the_message():
    """NaturalGradient used to be a loss run with SGD(lr=1). Passed as SVI's
    or fit's loss it is now a TypeError naming the new usage, and as the
    optimiser of another loss a ValueError naming it; in both cases before
    any parameter moves."""
    model, args = logistic()
    guide = AutoMultivariateNormal(model)
    guide(*args)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(TypeError, match=r"SVI\(model, guide, optim, optim.loss\)"):
        SVI(model, guide, pyro.optim.SGD({"lr": 1.0}), NaturalGradient(lr=0.5, num_samples=8)).step(*args)
    with pytest.raises(TypeError, match=r"optim.loss"):
        fit(
            model,
            guide,
            *args,
            steps=2,
            progress=False,
            optim=pyro.optim.SGD({"lr": 1.0}),
            loss=NaturalGradient(lr=0.5, num_samples=8),
        )
    with pytest.raises(ValueError, match=r"SVI\(model, guide, optim, optim.loss\)"):
        SVI(model, guide, NaturalGradient(lr=0.5, num_samples=8), Trace_ELBO()).step(*args)
    other = NaturalGradient(num_samples=2)  # another optimiser's loss records for that one only
    with pytest.raises(ValueError, match="optim.loss"):
        SVI(model, guide, NaturalGradient(num_samples=2), other.loss).step(*args)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value, before[name]), name


def test_model_params_are_a_clear_error():
    """The rule steps the guide's parameters; a pyro.param of the model is
    named, not silently left alone."""
    x, obs = logistic()[1]

    def model(x, obs):
        bias = pyro.param("bias", torch.tensor(0.0))
        w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
        with pyro.plate("data", len(obs)):
            pyro.sample("obs", dist.Bernoulli(logits=(w * x).sum(-1) + bias), obs=obs)

    guide = AutoNormal(model)
    with pytest.raises(ValueError, match="bias"):
        svi_for(model, guide, NaturalGradient(num_samples=2)).step(x, obs)


def test_state_is_pyro_optims(tmp_path):
    """One torch optimiser per guide parameter, made by PyroOptim; get_state
    holds each parameter's step count by name, and set_state hands it to the
    optimiser made after a clear (as Pyro's optimisers do)."""
    model, args = logistic()
    guide = AutoMultivariateNormal(model)
    optim = NaturalGradient(lr=0.5, num_samples=2)
    svi = svi_for(model, guide, optim)
    for _ in range(3):
        svi.step(*args)
    state = optim.get_state()
    names = {
        "AutoMultivariateNormal.loc",
        "AutoMultivariateNormal.scale",
        "AutoMultivariateNormal.scale_tril",
    }
    assert names <= set(state)
    assert all(state[n]["state"][0]["step"] == 3 for n in names)
    assert isinstance(optim, pyro.optim.PyroOptim) and len(optim.optim_objs) == 3
    optim.save(tmp_path / "optim.pt")
    fresh = NaturalGradient(lr=0.5, num_samples=2)
    fresh.load(tmp_path / "optim.pt")
    assert fresh.num_iterations == 3
    svi = svi_for(model, guide, fresh)
    svi.step(*args)
    assert all(fresh.get_state()[n]["state"][0]["step"] == 4 for n in names) and fresh.num_iterations == 4


@pytest.mark.parametrize("cls", [AutoMultivariateNormal, AutoNormal])
def test_fit_resumes_bitwise_from_a_checkpoint(tmp_path, cls):
    """curvi.fit interrupted after 6 steps (KeyboardInterrupt from the
    callback) and resumed in a fresh setting (new guide, new optimiser, param
    store cleared) gives bitwise the ELBO trace, parameters and optimiser
    state of an uninterrupted fit."""
    model, args = logistic()

    def run(steps, path, callback=None):
        optim = NaturalGradient(lr=0.5, num_samples=4, curvature="gradient", correction="always")
        guide = cls(model)
        result = fit(
            model,
            guide,
            *args,
            steps=steps,
            tol=None,
            progress=False,
            optim=optim,
            loss=optim.loss,
            checkpoint=path,
            checkpoint_every=4,
            callback=callback,
        )
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        return result, params, optim, optim.get_state()  # (get_state names by the live param store)

    pyro.set_rng_seed(0)
    full, full_params, full_optim, full_state = run(12, tmp_path / "full.pt")

    def interrupt(step, elbo):
        if step == 6:
            raise KeyboardInterrupt

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run(12, tmp_path / "part.pt", interrupt)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # the checkpoint's random state replaces this
    resumed, resumed_params, resumed_optim, resumed_state = run(12, tmp_path / "part.pt")
    assert "resumed" in resumed.message and len(resumed.elbo) == 12
    assert resumed.elbo == full.elbo
    assert set(resumed_params) == set(full_params)
    for name in full_params:
        assert torch.equal(resumed_params[name], full_params[name]), name
    assert resumed_optim.num_iterations == full_optim.num_iterations == 12
    assert resumed_optim.num_corrected == full_optim.num_corrected == 12
    assert full.elbo[-1] > full.elbo[0]
    assert resumed_state == full_state


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
    loss = NaturalGradient(num_samples=6).loss
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
    loss = NaturalGradient(num_samples=6).loss
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
        loss = NaturalGradient(num_samples=20000, curvature=curvature).loss
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
    loss = NaturalGradient(lr=0.5, num_samples=4000).loss.loss_and_grads(model, guide, *args)
    assert abs(loss + exact["log_evidence"].item()) < 0.15
    for cls in (AutoNormal, AutoDiagonalNormal):  # the diagonal entropy, against Trace_ELBO
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = cls(model)
        guide(*args)
        ours = NaturalGradient(num_samples=4000).loss.loss_and_grads(model, guide, *args)
        theirs = Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(model, guide, *args)
        assert abs(ours - theirs) < 0.05 * abs(theirs)
