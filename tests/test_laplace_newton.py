"""Newton / natural-gradient steps for the amortized Laplace guide (curvi.laplace_newton).

Why one step is exact on the linear-Gaussian model: the log joint is
quadratic, so the guide's precision P is constant, ŷ(θ̂) is linear, and the
ELBO is ``log p(θ̂, ŷ(θ̂)) + const`` -- the profile log joint, a quadratic
in θ̂ whose Hessian is ``−S`` and whose maximiser is the posterior mean of θ.
A reparameterised K-particle gradient is that exact gradient plus
``−S · mean_k δ_θ,k`` (δ_θ,k = θ_k − θ̂), so a unit Newton step lands on
``mean − mean_k δ_θ,k``: exact exactly when the particles' δ_θ average to
zero, as antithetic pairs do.
"""

import functools
import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO

from curvi import AmortizedLaplaceGuide, fit
from curvi.laplace_newton import (
    FixedNoise,
    LaplaceNewton,
    fit_newton,
    newton_step,
    particle_elbos,
)
from models import make_linear_gaussian, make_logistic_long

PERTURBATION = torch.tensor([0.7, -0.4])


def perturbed(model, args, plate):
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    guide(*args)
    with torch.no_grad():
        guide.loc_global_unconstrained.add_(PERTURBATION)
    return guide


# ------------------------------------------------------------ exactness
@pytest.mark.parametrize("num_particles", [2, 6])
def test_one_newton_step_lands_on_the_exact_posterior_mean(num_particles):
    model, args, plate, exact = make_linear_gaussian()
    guide = perturbed(model, args, plate)
    optim = LaplaceNewton(guide, max_step=math.inf)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=num_particles, vectorize_particles=True))
    with FixedNoise(seed=3, antithetic=True):
        svi.step(*args)
    torch.testing.assert_close(guide.loc_global, exact["mean"][:2], rtol=0, atol=1e-8)
    assert not optim.last.fallback and not optim.last.clipped


def test_without_antithetic_pairs_the_step_is_off_by_the_draws_mean():
    """The single-draw step misses by exactly −δ_θ (one posterior sd of noise)."""
    model, args, plate, exact = make_linear_gaussian()
    guide = perturbed(model, args, plate)
    svi = SVI(model, guide, LaplaceNewton(guide, max_step=math.inf), Trace_ELBO())
    with FixedNoise(seed=3, antithetic=False):
        trace = pyro.poutine.trace(guide).get_trace(*args)
    delta = trace.nodes["_AmortizedLaplaceGuide_global"]["value"] - guide.loc_global.detach()
    with FixedNoise(seed=3, antithetic=False):
        svi.step(*args)
    error = guide.loc_global.detach() - exact["mean"][:2]
    torch.testing.assert_close(error, -delta, rtol=0, atol=1e-8)
    assert error.abs().max() > 1e-3


def test_fit_newton_one_iteration_is_exact_and_the_elbo_is_the_evidence():
    model, args, plate, exact = make_linear_gaussian()
    guide = perturbed(model, args, plate)
    result = fit_newton(model, guide, *args, num_particles=4, blocks=1, max_step=math.inf)
    torch.testing.assert_close(result.theta, exact["mean"][:2], rtol=0, atol=1e-8)
    assert result.evaluations == 2  # the start and one step; then converged
    assert result.converged and result.fallbacks == 0
    # the guide is the exact posterior: every antithetic pair mean is log p(z)
    assert abs(result.elbo - exact["log_evidence"].item()) < 1e-8
    assert result.se < 1e-8


# ------------------------------------------------------- a non-Gaussian model
LOGISTIC = {"num_groups": 100, "seed": 4}


@functools.lru_cache(maxsize=1)
def adam_optimum_cached():
    model, args, plate = make_logistic_long(**LOGISTIC)
    return adam_optimum(model, args, plate)[0]


def adam_optimum(model, args, plate, steps=800, particles=16):
    """θ̂ of a long Adam run, iterates averaged over its second half."""
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.999}),
              Trace_ELBO(num_particles=particles, vectorize_particles=True))
    total = 0.0
    for step in range(steps):
        svi.step(*args)
        if step >= steps // 2:
            total = total + guide.loc_global.detach()
    return total / (steps - steps // 2), guide


def crn_gap(model, guide, args, a, b, chunks=20, particles=64):
    """ELBO(a) − ELBO(b) with common random numbers, and its SE."""
    diffs = []
    for c in range(chunks):
        values = []
        for theta in (a, b):
            with torch.no_grad():
                guide.loc_global_unconstrained.copy_(theta)
                with FixedNoise(seed=100 + c):
                    values.append(particle_elbos(model, guide, *args, num_particles=particles).mean())
        diffs.append(values[0] - values[1])
    diffs = torch.stack(diffs)
    return diffs.mean().item(), diffs.std().item() / math.sqrt(chunks)


def test_fit_newton_travels_from_a_far_start():
    """100 posterior sds away, a fixed trust radius of 2 sds would need 50
    steps; the radius doubles after each clipped full step, so the exact
    mean is reached in a handful. A block cut short by max_iter is reported
    as not converged, also when it is the only one."""
    model, args, plate, exact = make_linear_gaussian()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    guide(*args)
    S = guide.last_global_precision
    direction = torch.tensor([1.0, -1.0], dtype=torch.float64)
    far = exact["mean"][:2] + 100 * direction / (direction @ S @ direction).sqrt()
    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(far)
    result = fit_newton(model, guide, *args, num_particles=4, blocks=1, max_step=2.0)
    torch.testing.assert_close(result.theta, exact["mean"][:2], rtol=0, atol=1e-8)
    assert result.converged and result.evaluations <= 10
    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(far)
    short = fit_newton(model, guide, *args, num_particles=4, blocks=1, max_step=2.0, max_iter=1)
    assert not short.converged and "not converged" in short.message


def test_laplace_newton_radius_grows_far_from_the_optimum():
    """SVI steps from 100 posterior sds away with exact (antithetic)
    gradients: the radius doubles along the way, then a full step lands."""
    model, args, plate, exact = make_linear_gaussian()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    guide(*args)
    S = guide.last_global_precision
    direction = torch.tensor([1.0, -1.0], dtype=torch.float64)
    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(exact["mean"][:2] + 100 * direction / (direction @ S @ direction).sqrt())
    optim = LaplaceNewton(guide, max_step=1.0)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=2, vectorize_particles=True))
    for _ in range(9):
        with FixedNoise(seed=1, antithetic=True):
            svi.step(*args)
    torch.testing.assert_close(guide.loc_global, exact["mean"][:2], rtol=0, atol=1e-8)
    assert not optim.last.clipped and optim.radius == 1.0


def test_fit_newton_reaches_the_optimum_of_a_long_adam_run():
    """Both start at the Laplace-marginal mode: the ELBO of this small
    logistic model is not unimodal (from a prior draw, both Newton and Adam
    can settle ~3 nats lower, at another slope)."""
    model, args, plate = make_logistic_long(**LOGISTIC)
    theta_adam = adam_optimum_cached()

    pyro.clear_param_store()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    result = fit_newton(model, guide, *args, num_particles=64, blocks=4)
    assert result.converged, result.message
    S = guide.last_global_precision
    d = result.theta - theta_adam
    assert (d @ S @ d).sqrt() < 0.3  # posterior sds of q(θ)
    gap, se = crn_gap(model, guide, args, result.theta, theta_adam, chunks=10)
    assert abs(gap) < max(0.03, 3 * se)


def test_laplace_newton_with_decay_converges_like_adam():
    """The SVI optimiser: noisy unit steps whose size decays, θ̂ the running
    mean of the Newton targets (decay=1)."""
    model, args, plate = make_logistic_long(**LOGISTIC)
    theta_adam = adam_optimum_cached()
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    svi = SVI(model, guide, LaplaceNewton(guide, decay=1.0),
              Trace_ELBO(num_particles=16, vectorize_particles=True))
    for _ in range(200):
        svi.step(*args)
    S = guide.last_global_precision
    d = guide.loc_global.detach() - theta_adam
    assert (d @ S @ d).sqrt() < 0.3


# ------------------------------------------------------------- fallback
def test_newton_step_falls_back_to_a_gradient_step():
    g = torch.tensor([3.0, -4.0])
    for bad in (-torch.eye(2), torch.full((2, 2), math.nan), None):
        step = newton_step(g, bad, fallback_lr=0.1)
        assert step.fallback and math.isnan(step.decrement)
        torch.testing.assert_close(step.step, -0.1 * g)
    step = newton_step(g, None, fallback_lr=1.0, max_step=1.0)  # capped: |g| = 5
    torch.testing.assert_close(step.step, -g / 5)
    assert step.clipped


def test_trust_region_caps_the_step_in_the_s_metric():
    S = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    g = torch.tensor([10.0, -3.0])
    full = newton_step(g, S, max_step=math.inf)
    torch.testing.assert_close(full.step, -torch.linalg.solve(S, g))
    assert full.decrement == pytest.approx(math.sqrt(g @ torch.linalg.solve(S, g)))
    capped = newton_step(g, S, max_step=0.5)
    assert capped.clipped
    assert (capped.step @ S @ capped.step).sqrt().item() == pytest.approx(0.5)
    torch.testing.assert_close(capped.step / capped.step.norm(), full.step / full.step.norm())


class IndefiniteReport(AmortizedLaplaceGuide):
    """Reports a precision that is not positive definite (sampling is unchanged)."""

    def forward(self, *args, **kwargs):
        result = super().forward(*args, **kwargs)
        self.last_global_precision = -self.last_global_precision
        return result


def test_optimiser_and_fit_newton_fall_back_when_s_is_not_positive_definite():
    model, args, plate, exact = make_linear_gaussian()
    guide = IndefiniteReport(model, unit_plate=plate)
    guide(*args)
    with torch.no_grad():
        guide.loc_global_unconstrained.add_(PERTURBATION)
    optim = LaplaceNewton(guide, fallback_lr=1e-3)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=2, vectorize_particles=True))
    before = guide.loc_global.detach().clone()
    with FixedNoise(seed=0):
        loss = Trace_ELBO(num_particles=2, vectorize_particles=True).differentiable_loss(model, guide, *args)
    (grad,) = torch.autograd.grad(loss, guide.loc_global_unconstrained)
    with FixedNoise(seed=0):
        svi.step(*args)
    assert optim.num_fallbacks == 1 and optim.last.fallback
    torch.testing.assert_close(guide.loc_global.detach() - before, -1e-3 * grad)

    start = guide.loc_global.detach().clone()
    with FixedNoise(seed=0):
        value_start = particle_elbos(model, guide, *args, num_particles=4).mean()
    result = fit_newton(model, guide, *args, num_particles=4, blocks=1, max_iter=5, fallback_lr=0.01)
    assert result.fallbacks > 0
    with torch.no_grad(), FixedNoise(seed=0):
        guide.loc_global_unconstrained.copy_(result.theta)
        value_end = particle_elbos(model, guide, *args, num_particles=4).mean()
    assert value_end > value_start  # the line search only accepts rises
    assert not torch.equal(result.theta, start)


# ------------------------------------------------------- noise and ELBOs
def test_fixed_noise_is_deterministic_and_antithetic():
    model, args, plate, _ = make_linear_gaussian()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True)
    with FixedNoise(seed=5):
        trace = pyro.poutine.trace(pyro.plate("particles", 4, dim=-3)(guide)).get_trace(*args)
        a = loss.loss(model, guide, *args)
    with FixedNoise(seed=5):
        b = loss.loss(model, guide, *args)
    assert a == b
    theta = trace.nodes["_AmortizedLaplaceGuide_global"]["value"].reshape(4, -1)
    delta = theta - guide.loc_global.detach()
    torch.testing.assert_close(delta[:2], -delta[2:])


def test_particle_elbos_average_to_trace_elbo():
    model, args, plate = make_logistic_long()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    guide(*args)
    with FixedNoise(seed=2, antithetic=False):
        values = particle_elbos(model, guide, *args, num_particles=6)
    with FixedNoise(seed=2, antithetic=False):
        reference = -Trace_ELBO(num_particles=6, vectorize_particles=True).differentiable_loss(
            model, guide, *args)
    assert values.shape == (6,)
    torch.testing.assert_close(values.mean(), reference)


def test_other_parameters_go_to_others():
    def model(obs):
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, scale))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

    obs = torch.randn(6, 3)
    guide = AmortizedLaplaceGuide(model, unit_plate="groups")
    svi = SVI(model, guide, LaplaceNewton(guide), Trace_ELBO())
    with pytest.raises(ValueError, match="'scale'.*others="):
        svi.step(obs)
    pyro.clear_param_store()
    guide = AmortizedLaplaceGuide(model, unit_plate="groups")
    optim = LaplaceNewton(guide, others=pyro.optim.Adam({"lr": 0.1}))
    svi = SVI(model, guide, optim, Trace_ELBO())
    svi.step(obs)
    assert pyro.param("scale").item() != 1.0 and optim.num_steps == 1
    assert set(optim.get_state()) == {"num_steps", "num_fallbacks", "num_inside", "radius", "last", "others"}


# ----------------------------------------------------------- bad options
def test_bad_options():
    model, args, plate, _ = make_linear_gaussian()
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    for kwargs, match in [
        ({"lr": 0.0}, "lr must be"),
        ({"lr": math.inf}, "lr must be"),
        ({"decay": -1.0}, "decay must be"),
        ({"max_step": 0}, "max_step must be"),
        ({"fallback_lr": -1}, "fallback_lr must be"),
        ({"others": "adam"}, "others must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            LaplaceNewton(guide, **kwargs)
    with pytest.raises(ValueError, match="AmortizedLaplaceGuide or LaplaceGuide"):
        LaplaceNewton(pyro.infer.autoguide.AutoNormal(model))
    for kwargs, match in [
        ({"num_particles": 3}, "even num_particles"),
        ({"num_particles": 0}, "num_particles must be"),
        ({"blocks": 0}, "blocks must be"),
        ({"max_iter": 1.5}, "max_iter must be"),
        ({"tol": -1.0}, "tol must be"),
        ({"max_step": -1.0}, "max_step must be"),
        ({"num_particles": 4, "eval_particles": 6}, "multiple of num_particles"),
        ({"seed": 1.5}, "seed must be"),
        ({"callback": 3}, "callback must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            fit_newton(model, guide, *args, **kwargs)
    with pytest.raises(ValueError, match="seed must be"):
        FixedNoise(seed="a")
    with pytest.raises(ValueError, match="antithetic must be"):
        FixedNoise(antithetic=1)
    with pytest.raises(ValueError, match="even number of vectorized particles"):
        with FixedNoise(antithetic=True):
            Trace_ELBO(num_particles=3, vectorize_particles=True).loss(model, guide, *args)


def test_fit_uses_laplace_newton_by_default_for_the_amortized_guide():
    model, args, plate, exact = make_linear_gaussian()
    guide = perturbed(model, args, plate)
    result = fit(model, guide, *args, steps=60, tol=None, progress=False)
    S = guide.last_global_precision
    d = guide.loc_global.detach() - exact["mean"][:2]
    assert (d @ S @ d).sqrt() < 0.1  # posterior sds, from 0.7 / 0.4 away
    assert result.steps == 60


def test_fit_default_names_the_particle_plate_when_the_model_does_not_broadcast():
    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu[0], 1.0))  # mu[0], not mu[..., 0]
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(u + mu[1], 1.0), obs=obs)

    obs = torch.randn(6, 3, dtype=torch.float64)
    guide = AmortizedLaplaceGuide(model, unit_plate="groups")
    with pytest.raises(ValueError, match="vectorized particles"):
        fit(model, guide, obs, steps=3, progress=False)
    result = fit(model, guide, obs, steps=3, progress=False, loss=Trace_ELBO())  # the way out
    assert len(result.elbo) == 3
