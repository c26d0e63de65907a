"""Newton / natural-gradient steps for the amortized Laplace guide.

The only parameter of :class:`~curvi.guides.AmortizedLaplaceGuide` is θ̂, the
mean of q(θ) = N(θ̂, S⁻¹), and the guide computes S at every call (DESIGN
§2, §6). The natural gradient of the ELBO with respect to a Gaussian's mean
is the gradient preconditioned by the covariance, here ``S⁻¹ g``: a Newton
step for θ̂ at no extra cost, since S is (up to third derivatives) the
negative Hessian of the ELBO in θ̂.

**Exactness.** For a linear-Gaussian model the ELBO of this guide is
``log p(θ̂, ŷ(θ̂)) + const``, a quadratic in θ̂ with Hessian ``−S``, so one
unit step with the *exact* gradient lands on the posterior mean. A
reparameterised single-draw gradient is not exact: its noise is ``−S δ_θ``
with ``δ_θ = θ − θ̂ ~ N(0, S⁻¹)``, so a unit Newton step jitters θ̂ by a full
posterior sd per draw. That noise is linear in the draw's ε; antithetic
pairs (ε, −ε) cancel it exactly in a Gaussian model and to leading order in
a near-Gaussian one (:class:`FixedNoise`).

Two ways to use the step:

* :class:`LaplaceNewton` -- a Pyro optimiser, ``SVI(model, guide,
  LaplaceNewton(guide), loss)``: a damped, trust-region Newton step on
  θ̂ from whatever gradient ``loss`` gives, with a step size that may decay
  to average out Monte Carlo noise;
* :func:`fit_newton` -- the sample-average variant: the noise is held fixed
  for a block of iterations (so the K-particle ELBO is a deterministic
  function of θ̂), a few damped Newton iterations with a line search solve
  it, then the noise is refreshed; the blocks' solutions are averaged and
  the final ELBO is reported with its Monte Carlo standard error.
"""

from __future__ import annotations

import math
import numbers
import statistics
from typing import NamedTuple

import torch

import pyro
import pyro.optim
import pyro.poutine as poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger

__all__ = ["FixedNoise", "LaplaceNewton", "NewtonFit", "NewtonStep", "fit_newton",
           "newton_step", "particle_elbos"]


# ---------------------------------------------------------------------------
# the step (a pure function)


class NewtonStep(NamedTuple):
    """The result of :func:`newton_step`.

    :ivar step: the change of θ̂, ``(p,)``.
    :ivar float decrement: the Newton decrement ``sqrt(gᵀ S⁻¹ g)`` (the full
        Newton step's length in posterior sds); ``nan`` on the fallback path.
    :ivar bool clipped: whether the trust region shortened the step.
    :ivar bool fallback: whether S was not positive definite and a plain
        gradient step was taken instead.
    """

    step: torch.Tensor
    decrement: float
    clipped: bool
    fallback: bool


def newton_step(grad, precision, *, lr=1.0, max_step=1.0, fallback_lr=0.01) -> NewtonStep:
    """A damped Newton step ``−lr · S⁻¹ grad`` that *descends* a loss.

    ``grad`` is the gradient of the loss (the negative ELBO) with respect to
    θ̂, ``precision`` the precision S of q(θ). The step is capped to length
    ``max_step`` in the S-metric, ``sqrt(Δᵀ S Δ) ≤ max_step`` (a trust region
    measured in posterior standard deviations). When S is not positive
    definite (its Cholesky factorisation fails) or not finite, the step is
    the plain gradient step ``−fallback_lr · grad``, capped to Euclidean
    length ``max_step``.

    Usage::

        S = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
        g = torch.tensor([1.0, -1.0])
        newton_step(g, S, max_step=math.inf).step    # -S⁻¹ g
        newton_step(g, S, max_step=0.1).clipped      # True
        newton_step(g, -S).fallback                  # True: a gradient step

    :param grad: ``(p,)`` gradient of the loss.
    :param precision: ``(p, p)`` symmetric precision S, or ``None`` (fallback).
    :param float lr: step size on the Newton step (1: the full step).
    :param float max_step: trust radius in posterior sds (``math.inf``: none).
    :param float fallback_lr: step size of the gradient fallback.
    """
    _check_positive("lr", lr)
    _check_positive("max_step", max_step, allow_inf=True)
    _check_positive("fallback_lr", fallback_lr)
    grad = grad.detach()
    L = None
    if precision is not None and torch.isfinite(precision).all():
        L, info = torch.linalg.cholesky_ex(precision.detach().to(grad.dtype))
        L = L if info.item() == 0 else None
    if L is None:
        step = -fallback_lr * grad
        norm = step.norm().item()
        clipped = norm > max_step
        if clipped:
            step = step * (max_step / norm)
        return NewtonStep(step, math.nan, clipped, True)
    direction = torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)  # S⁻¹ g
    decrement = math.sqrt(max((grad * direction).sum().item(), 0.0))
    length = lr * decrement
    clipped = length > max_step
    scale = lr * (max_step / length if clipped else 1.0)
    return NewtonStep(-scale * direction, decrement, clipped, False)


def _check_positive(name, value, allow_inf=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
    if not ok or (not allow_inf and not math.isfinite(value)) or math.isnan(value):
        expected = "a number > 0 (math.inf allowed)" if allow_inf else "a finite number > 0"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _guide_param(guide):
    if not hasattr(guide, "loc_global_unconstrained"):
        raise ValueError(
            f"{type(guide).__name__} has no parameter loc_global: pass an "
            "AmortizedLaplaceGuide that has been called once (its parameters are "
            "created lazily)"
        )
    return guide.loc_global_unconstrained


# ---------------------------------------------------------------------------
# the optimiser for SVI


class LaplaceNewton(pyro.optim.PyroOptim):
    """Pyro optimiser: damped Newton steps on the θ̂ of a Laplace guide.

    After each ``loss_and_grads`` of :class:`~pyro.infer.SVI`, reads the
    gradient of the guide's ``loc_global`` and the precision S of q(θ) the
    guide computed in that evaluation (``guide.last_global_precision``), and
    takes :func:`newton_step` with step size ``lr / (1 + decay · t)`` after
    ``t`` steps inside the trust region. Any other parameter the loss touches (say a ``pyro.param``
    of the model) is passed to ``others``.

    **Monte Carlo noise.** A unit step from a single-draw gradient moves θ̂
    by about one posterior sd of noise (see the module docstring), costing
    ``≈ p / 2`` nats of ELBO for ``p`` globals. With a constant step ``γ``
    the stationary error is ``γ / (2 − γ)`` posterior variances per
    coordinate; ``decay > 0`` averages it away (``lr / (1 + decay t)`` with
    ``decay = 1`` makes θ̂ the running mean of the Newton targets). Many
    particles divide the noise by their number; antithetic particles
    (:class:`FixedNoise`) remove its leading term.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer import SVI, Trace_ELBO
        from curvi import AmortizedLaplaceGuide

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

        pyro.clear_param_store()
        obs = torch.poisson(torch.full((20, 5), 3.0))
        guide = AmortizedLaplaceGuide(model, unit_plate="groups")
        optim = LaplaceNewton(guide, decay=0.5)
        svi = SVI(model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
        for step in range(20):
            svi.step(obs)
        optim.last  # the last NewtonStep

    :param guide: an :class:`~curvi.guides.AmortizedLaplaceGuide` (or a
        :class:`~curvi.guides.LaplaceGuide`, whose ``loc_local`` then goes to
        ``others``).
    :param float lr: the Newton step size (1: a full step).
    :param float decay: step-size decay, ``lr / (1 + decay · t)`` (≥ 0),
        ``t`` counting the steps the trust region did not clip (far from
        the optimum the steps keep their full size).
    :param float max_step: trust radius, in posterior sds of q(θ); it
        doubles while consecutive clipped steps point the same way (far from
        the optimum) and returns to ``max_step`` as soon as they do not.
    :param float fallback_lr: step size of the gradient step taken when S is
        not positive definite.
    :param ~pyro.optim.PyroOptim others: optimiser of any other parameter;
        ``None`` raises a ValueError if there is one.
    """

    def __init__(self, guide, *, lr=1.0, decay=0.0, max_step=1.0, fallback_lr=0.01, others=None):
        _check_positive("lr", lr)
        _check_positive("max_step", max_step, allow_inf=True)
        _check_positive("fallback_lr", fallback_lr)
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay < math.inf:
            raise ValueError(f"decay must be a finite number >= 0, got {decay!r}")
        if others is not None and not isinstance(others, pyro.optim.PyroOptim):
            raise ValueError(f"others must be a pyro.optim.PyroOptim or None, got {others!r}")
        from .guides import _LaplaceGuideBase

        if not isinstance(guide, _LaplaceGuideBase):
            raise ValueError(
                f"LaplaceNewton needs an AmortizedLaplaceGuide or LaplaceGuide, got {type(guide).__name__}"
            )
        self.guide = guide
        self.lr, self.decay, self.max_step, self.fallback_lr = lr, decay, max_step, fallback_lr
        self.others = others
        self.num_steps, self.num_fallbacks, self.last = 0, 0, None
        #: steps taken inside the trust region: the clock of the decay
        self.num_inside = 0
        self.radius = max_step  # the current trust radius
        # what curvi.fit clears when it restores a checkpoint
        self.optim_objs, self.grad_clip = {}, {}

    def __call__(self, params, *args, **kwargs) -> None:
        """Step θ̂ (and pass the other parameters to ``others``)."""
        param = _guide_param(self.guide)
        rest = [p for p in params if p is not param and p.grad is not None]
        if rest:
            if self.others is None:
                store = pyro.get_param_store()
                names = [store.param_name(p) or "<unnamed>" for p in rest]
                raise ValueError(
                    f"LaplaceNewton steps only the guide's loc_global; the loss also has "
                    f"gradients for {names}: pass an optimiser for them as others="
                )
            self.others(rest, *args, **kwargs)
        if param.grad is None:
            return
        precision = self.guide.last_global_precision
        lr = self.lr / (1.0 + self.decay * self.num_inside)
        step = newton_step(param.grad, precision, lr=lr, max_step=self.radius,
                           fallback_lr=self.fallback_lr)
        # far from the optimum, clipped steps keep pointing the same way: the
        # radius doubles while they do, and is back at max_step otherwise
        previous = self.last
        aligned = (previous is not None and previous.clipped and not previous.fallback
                   and (previous.step * step.step).sum().item() > 0)
        self.radius = 2.0 * self.radius if step.clipped and not step.fallback and aligned else self.max_step
        with torch.no_grad():
            param.add_(step.step.to(param.dtype))
        self.num_steps += 1
        self.num_inside += int(not step.clipped and not step.fallback)
        self.num_fallbacks += int(step.fallback)
        self.last = step

    def get_state(self) -> dict:
        """Step counts (and ``others``' state): what the next step depends on."""
        state = {"num_steps": self.num_steps, "num_fallbacks": self.num_fallbacks,
                 "num_inside": self.num_inside,
                 "radius": self.radius, "last": None if self.last is None else tuple(self.last)}
        if self.others is not None:
            state["others"] = self.others.get_state()
        return state

    def set_state(self, state_dict: dict) -> None:
        """Restore :meth:`get_state`."""
        self.num_steps = int(state_dict.get("num_steps", 0))
        self.num_inside = int(state_dict.get("num_inside", 0))
        self.num_fallbacks = int(state_dict.get("num_fallbacks", 0))
        self.radius = float(state_dict.get("radius", self.max_step))
        last = state_dict.get("last")
        self.last = None if last is None else NewtonStep(*last)
        if self.others is not None and "others" in state_dict:
            self.others.optim_objs.clear()
            self.others.grad_clip.clear()
            self.others.set_state(state_dict["others"])


# ---------------------------------------------------------------------------
# fixed and antithetic noise


class FixedNoise(Messenger):
    """Draw the guide's Gaussian auxiliary sites from a fixed seed, optionally
    in antithetic pairs.

    Inside ``with FixedNoise(seed):`` every reparameterised sample site of a
    distribution with ``loc`` and ``scale_tril`` (a Laplace guide's q(θ) and
    q(yᵢ | θ)) is ``loc + scale_tril ε`` with ε from a generator seeded with
    ``seed`` at each entry, so repeated evaluations see the same ε and the
    loss is a deterministic function of the parameters. With
    ``antithetic=True`` (under ``vectorize_particles``, an even number of
    particles) the second half of the particles uses ``−ε`` of the first
    half. Other sites (observed, ``Delta``, ...) are left alone. Enter it
    around the whole loss evaluation, outside the particle plate.

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer import Trace_ELBO
        from curvi import AmortizedLaplaceGuide

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

        obs = torch.randn(6, 3)
        guide = AmortizedLaplaceGuide(model, unit_plate="groups")
        loss = Trace_ELBO(num_particles=4, vectorize_particles=True)
        with FixedNoise(seed=1, antithetic=True):
            a = loss.loss(model, guide, obs)
        with FixedNoise(seed=1, antithetic=True):
            b = loss.loss(model, guide, obs)
        assert a == b

    :param int seed: seed of the noise.
    :param bool antithetic: pair each particle with its mirror image.
    """

    def __init__(self, seed: int = 0, *, antithetic: bool = True):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(antithetic, bool):
            raise ValueError(f"antithetic must be True or False, got {antithetic!r}")
        super().__init__()
        self.seed, self.antithetic = int(seed), antithetic
        self._generators = {}

    def __enter__(self):
        self._generators = {}
        return super().__enter__()

    def _generator(self, device):
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or not getattr(fn, "has_rsample", False):
            return
        loc, scale_tril = getattr(fn, "loc", None), getattr(fn, "scale_tril", None)
        if loc is None or scale_tril is None:
            return
        shape = fn.batch_shape + fn.event_shape
        eps = torch.randn(shape, generator=self._generator(loc.device), dtype=loc.dtype,
                          device=loc.device)
        if self.antithetic:
            if len(shape) <= len(fn.event_shape) or shape[0] % 2:
                raise ValueError(
                    f"FixedNoise(antithetic=True) needs an even number of vectorized particles "
                    f"at site {msg['name']!r} (sample shape {tuple(shape)}); use "
                    "Trace_ELBO(num_particles=2m, vectorize_particles=True)"
                )
            half = shape[0] // 2
            eps = torch.cat([eps[:half], -eps[:half]])
        msg["value"] = loc + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1)


def particle_elbos(model, guide, *args, num_particles=2, max_plate_nesting=None, **kwargs):
    """The ELBO of each of ``num_particles`` vectorized particles, ``(K,)``,
    differentiable: ``log p(x, z) − log q(x)`` summed over sites, the
    particle axis kept. Their mean is ``−Trace_ELBO(num_particles=K,
    vectorize_particles=True).differentiable_loss``.

    Usage::

        import pyro, pyro.distributions as dist

        def model():
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

        def guide():
            pass

        particle_elbos(model, guide, num_particles=4)  # four times log N(0.5; 0, 1)

    :param int max_plate_nesting: as in :class:`~pyro.infer.Trace_ELBO`
        (default: guessed by running model and guide once more).
    """
    _check_count("num_particles", num_particles, 1)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                      max_plate_nesting=math.inf if max_plate_nesting is None else max_plate_nesting)
    return _particle_values(elbo, model, guide, args, kwargs)


def _particle_values(elbo, model, guide, args, kwargs):
    """Per-particle ELBOs from one vectorized trace of ``elbo`` (a Trace_ELBO;
    reuse it so that max_plate_nesting is guessed once)."""
    model_trace, guide_trace = next(iter(elbo._get_traces(model, guide, args, kwargs)))
    depth = elbo.max_plate_nesting  # the particle plate is the leftmost of these dims
    total = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            lp = site["log_prob"]
            while lp.dim() < depth:
                lp = lp.unsqueeze(0)
            total = total + sign * lp.reshape(lp.shape[:lp.dim() - depth + 1] + (-1,)).sum(-1)
    values = torch.as_tensor(total).reshape(-1)
    K = elbo.num_particles
    return values.expand(K) if values.numel() == 1 else values


def _check_count(name, value, least):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


# ---------------------------------------------------------------------------
# the sample-average variant


class NewtonFit(NamedTuple):
    """The result of :func:`fit_newton`.

    :ivar float elbo: ELBO estimate at the final θ̂, from fresh noise.
    :ivar float se: its Monte Carlo standard error (from antithetic pair
        means, or particles, when not antithetic).
    :ivar theta: the final θ̂ (unconstrained), ``(p,)``.
    :ivar float theta_se: the Monte Carlo error of θ̂ in posterior sds of
        q(θ), ``sqrt(mean‖θ̂_b − θ̂‖²_S / (B − 1) / B)`` over the ``B``
        averaged block solutions (``nan`` for one block): the expected ELBO
        lost to it is about ``theta_se² / 2`` nats.
    :ivar list block_elbos: each block's sample-average ELBO at its solution.
    :ivar int evaluations: loss-and-gradient evaluations used in the blocks.
    :ivar int fallbacks: steps where S was not positive definite.
    :ivar bool converged: whether every averaged block met ``tol``.
    :ivar str message: a one-line summary.
    """

    elbo: float
    se: float
    theta: torch.Tensor
    theta_se: float
    block_elbos: list
    evaluations: int
    fallbacks: int
    converged: bool
    message: str


def fit_newton(model, guide, *args, num_particles=32, antithetic=True, blocks=3,
               quasi_newton=True, max_iter=10, tol=0.01, max_step=2.0, fallback_lr=0.01, eval_particles=None,
               seed=0, callback=None, **kwargs) -> NewtonFit:
    """Sample-average Newton: fix the noise, solve, refresh, average.

    For block ``b = 0 .. blocks−1`` the guide's noise is fixed
    (:class:`FixedNoise` with seed ``seed + b``), so that the
    ``num_particles``-particle ELBO ``L_b(θ̂)`` is a deterministic function of
    θ̂, and at most ``max_iter`` damped Newton iterations maximise it: the
    direction ``S⁻¹ ∇L_b`` (:func:`newton_step`, trust radius ``max_step``
    posterior sds, gradient fallback when S is not positive definite), then
    backtracking until ``L_b`` rises by at least a quarter of the predicted
    gain. A block ends when the predicted gain ``½ gᵀ S⁻¹ g`` is below
    ``tol`` nats (the blocks after the first take at least one step, so
    that each solution carries its own noise), or after ``max_iter``
    iterations (``5 · max_iter`` for the first block, which travels from the
    start). With ``quasi_newton`` (default) the metric starts at the
    guide's S and is refined by BFGS updates from the gradients of the
    iterations, carried across blocks: S alone can be far from the ELBO's
    curvature (e.g. for variance parameters in a centred hierarchy, where
    the joint Schur complement is not the marginal curvature), which makes
    plain S-preconditioned iterations converge only linearly. The final θ̂ is the mean of the solutions of the blocks
    after the first (the first one travels from the starting point), or the
    first block's when ``blocks == 1``; the spread of the averaged solutions
    gives ``theta_se``. The ELBO at the final θ̂ is then estimated from fresh
    noise (``eval_particles``, default ``4 · num_particles``) with its
    standard error.

    Antithetic particles matter: the reparameterised gradient's noise is
    ``−S δ_θ`` to first order, so without them each block's solution sits
    about ``1 / sqrt(num_particles)`` posterior sds from the optimum; with
    them only the non-Gaussian remainder is left. In a linear-Gaussian model
    one block of one iteration lands on the exact posterior mean.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import AmortizedLaplaceGuide

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

        pyro.clear_param_store()
        obs = torch.poisson(torch.full((50, 5), 3.0))
        guide = AmortizedLaplaceGuide(model, unit_plate="groups")
        result = fit_newton(model, guide, obs, num_particles=16, blocks=3)
        print(result.message)  # ELBO ... ± ...

    :param model: a Pyro model with one unit plate.
    :param guide: an :class:`~curvi.guides.AmortizedLaplaceGuide` (called
        once here if it has not been).
    :param int num_particles: particles per block (even when antithetic).
    :param bool antithetic: antithetic particle pairs.
    :param int blocks: noise refreshes.
    :param bool quasi_newton: refine S by BFGS updates (else every step
        uses the guide's S at the current θ̂).
    :param int max_iter: Newton iterations per block at most (five times as
        many for the first).
    :param float tol: predicted gain, in nats, that ends a block.
    :param float max_step: initial (and smallest) trust radius in posterior
        sds of q(θ); it doubles after every full step it clipped (far from
        the optimum) and shrinks back when the line search backtracks.
    :param float fallback_lr: step size of the gradient fallback.
    :param int eval_particles: particles of the final ELBO estimate (a
        multiple of ``num_particles``).
    :param int seed: seed of the first block; the final estimate uses
        ``seed + blocks`` onwards.
    :param callback: ``callback(block, iteration, elbo)`` after every
        accepted iteration; a true return value stops the fit.
    :returns: a :class:`NewtonFit`.
    """
    _check_count("num_particles", num_particles, 1)
    if antithetic and num_particles % 2:
        raise ValueError(f"antithetic particles need an even num_particles, got {num_particles!r}")
    _check_count("blocks", blocks, 1)
    _check_count("max_iter", max_iter, 1)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    _check_positive("max_step", max_step, allow_inf=True)
    _check_positive("fallback_lr", fallback_lr)
    eval_particles = 4 * num_particles if eval_particles is None else eval_particles
    _check_count("eval_particles", eval_particles, num_particles)
    if eval_particles % num_particles:
        raise ValueError(
            f"eval_particles must be a multiple of num_particles={num_particles}, got {eval_particles!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {callback!r}")
    if not hasattr(guide, "loc_global_unconstrained"):
        with poutine.block():  # not under no_grad: the set-up's laplace_mode differentiates
            guide(*args, **kwargs)
    param = _guide_param(guide)
    loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                      max_plate_nesting=_plate_nesting(guide))

    def evaluate(block_seed):
        """ELBO (sample average) and its gradient at the current θ̂."""
        param.grad = None
        with FixedNoise(block_seed, antithetic=antithetic):
            values = _particle_values(loss, model, guide, args, kwargs)
        value = values.mean()
        (grad,) = torch.autograd.grad(value, param)
        return value.item(), grad, guide.last_global_precision

    solutions, block_elbos, block_precisions = [], [], []
    evaluations, fallbacks, all_converged, stopped = 0, 0, True, False
    curvature = None  # the metric of the steps: S, refined by BFGS updates
    radius = max_step  # the trust radius: grows while full clipped steps succeed
    for b in range(blocks):
        value, grad, S = evaluate(seed + b)
        evaluations += 1
        if curvature is None or not quasi_newton:
            curvature = S
        converged = False
        for it in range(max_iter if b > 0 else 5 * max_iter):
            step = newton_step(-grad, curvature, max_step=radius, fallback_lr=fallback_lr)
            fallbacks += int(step.fallback)
            # a refreshed block takes at least one step: its solution must
            # reflect its own noise, or averaging and theta_se mean nothing
            small = 0.5 * step.decrement**2 < tol and (b == 0 or it > 0)
            if not step.fallback and not step.clipped and small:
                converged = True
                break
            start = param.detach().clone()
            t, accepted = 1.0, False
            # rounding error of the summed log density: in float32 a 10⁵-term
            # ELBO cannot resolve gains below ~0.01 nat
            floor = 16 * torch.finfo(param.dtype).eps * abs(value)
            predicted = (grad * step.step).sum().item()
            for _ in range(10):
                with torch.no_grad():
                    param.copy_(start + t * step.step)
                new_value, new_grad, new_S = evaluate(seed + b)
                evaluations += 1
                if math.isfinite(new_value) and new_value >= value + 0.25 * t * predicted - floor:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                with torch.no_grad():
                    param.copy_(start)
                break
            # far from the optimum the radius doubles after each full step it
            # clipped, so the distance is covered in logarithmically many
            # steps; a backtracked step shrinks it back towards max_step
            if t == 1.0 and step.clipped:
                radius = 2.0 * radius
            elif t < 1.0:
                radius = max(max_step, radius * t)
            if step.fallback or step.clipped:
                # a gradient step, or far from the optimum: the guide's S at the
                # new point (BFGS would accumulate the curvature of far regions)
                curvature = new_S
            elif quasi_newton:
                curvature = _bfgs_update(curvature, t * step.step, grad - new_grad)
            else:
                curvature = new_S
            value, grad, S = new_value, new_grad, new_S
            if callback is not None and callback(b, it, value):
                stopped = True
                break
        if not converged and not stopped:
            step = newton_step(-grad, curvature, max_step=math.inf)
            converged = not step.fallback and 0.5 * step.decrement**2 < tol
        solutions.append(param.detach().clone())
        block_elbos.append(value)
        block_precisions.append(S)
        if b > 0 or blocks == 1:
            all_converged = all_converged and converged
        if stopped:
            break

    averaged = solutions[1:] if len(solutions) > 1 else solutions
    theta = torch.stack(averaged).mean(0)
    theta_se = math.nan
    S = block_precisions[-1]
    if len(averaged) > 1 and S is not None:
        spread = torch.stack(averaged) - theta
        mean_sq = ((spread @ S) * spread).sum(-1).sum().item() / (len(averaged) - 1)
        theta_se = math.sqrt(mean_sq / len(averaged))
    with torch.no_grad():
        param.copy_(theta)
        values = []
        for c in range(eval_particles // num_particles):
            with FixedNoise(seed + blocks + c, antithetic=antithetic):
                values.append(_particle_values(loss, model, guide, args, kwargs))
        values = torch.cat(values)
    if antithetic:
        half = num_particles // 2
        units = torch.cat([(v[:half] + v[half:]) / 2 for v in values.split(num_particles)])
    else:
        units = values
    elbo = units.mean().item()
    se = units.std().item() / math.sqrt(units.numel()) if units.numel() > 1 else math.nan
    status = "stopped by callback" if stopped else ("converged" if all_converged else "not converged")
    message = (f"ELBO {elbo:.6g} ± {se:.2g} (MC SE, {eval_particles} particles); θ̂ MC error "
               f"{theta_se:.2g} posterior sds; {len(solutions)} blocks, {evaluations} evaluations, "
               f"{status}")
    return NewtonFit(elbo, se, theta.clone(), theta_se, block_elbos, evaluations, fallbacks,
                     all_converged, message)


def _plate_nesting(guide):
    """The model's plate nesting from the guide's view of it (saves
    Trace_ELBO a guessing run of model and guide); ``inf`` (guess) without one."""
    view = getattr(guide, "view", None)
    return math.inf if view is None else view.max_plate_nesting


def _bfgs_update(H, s, y):
    """BFGS update of a Hessian approximation ``H`` of the loss (−ELBO) from a
    step ``s`` and the change ``y`` of the loss gradient; skipped (``H``
    kept) unless the curvature ``yᵀs`` along the step is clearly positive."""
    if H is None:
        return H
    ys = (y * s).sum()
    Hs = H @ s
    sHs = (s * Hs).sum()
    if not (ys > 1e-8 * sHs and sHs > 0):
        return H
    H = H - torch.outer(Hs, Hs) / sHs + torch.outer(y, y) / ys
    return 0.5 * (H + H.T)
