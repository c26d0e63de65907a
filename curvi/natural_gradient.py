"""Natural-gradient steps for Gaussian guides: the Bayesian learning rule.

For a Gaussian q = N(m, S⁻¹) over the unconstrained latents x, the natural
gradient of the ELBO in q's natural parameters gives the Bayesian learning
rule (Khan & Rue, 2023) with step size ρ:

    Ŝ  = −E_q[∇² log p(x)]                      (expected curvature)
    S' = (1 − ρ) S + ρ Ŝ
    m' = m + ρ S'⁻¹ E_q[∇ log p(x)]

Each expectation is a Monte Carlo average over ``num_samples`` draws of q
(``num_samples=0``: at the mean, exact when log p is quadratic). On a
Gaussian model one step with ρ = 1 lands on the exact posterior. Where Ŝ is
not positive definite (log p not concave over q), S' may not be either; the
*improved* rule of Lin, Schmidt & Khan (2020) adds ρ²/2 · G S⁻¹ G with
G = Ŝ − S, which keeps S' positive definite for any Ŝ without a line search:

    S' = S + ρ G + (ρ²/2) G S⁻¹ G.

``correction="auto"`` (the default) uses it exactly when the plain S' is not
positive definite, so steps stay exact where the plain rule is safe.

The step is taken as the *gradient* of a loss: :class:`NaturalGradient`
sets each guide parameter's ``.grad`` to minus its change, so that
``pyro.optim.SGD({"lr": 1.0})`` applies it — it runs in Pyro's ``SVI`` and
in :func:`curvi.fit` unchanged. Supported guides: Pyro's
``AutoMultivariateNormal`` (full S) and ``AutoNormal`` / ``AutoDiagonalNormal``
(diagonal S, from the diagonal of the expected Hessian).

**References**

1. M. E. Khan, H. Rue, *The Bayesian Learning Rule*, JMLR 24 (2023).
2. W. Lin, M. Schmidt, M. E. Khan, *Handling the Positive-Definite
   Constraint in the Bayesian Learning Rule*, ICML 2020.
"""

from __future__ import annotations

import math
import weakref

import torch

import pyro
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from .guide_moments import FlatLayout, batched_log_density, flat_log_density, gaussian_view


class NaturalGradient(pyro.infer.Trace_ELBO):
    r"""The Bayesian learning rule as a Pyro loss whose gradient is the step.

    ``loss_and_grads`` estimates E_q[∇ log p] and E_q[∇² log p], forms the
    new mean and precision, and writes minus the change of each guide
    parameter into its ``.grad``; apply it with
    ``pyro.optim.SGD({"lr": 1.0})`` (the step size is ``lr`` here). The
    returned loss is ``-ELBO`` at the parameters before the step, estimated
    from the step's own draws (the mean of log p over them plus q's entropy
    in closed form, so no extra model run), or with ``num_samples=0`` by
    ``Trace_ELBO`` with ``elbo_particles`` particles.

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.infer import SVI
        from pyro.infer.autoguide import AutoMultivariateNormal
        from curvi import NaturalGradient

        def model(x, obs):
            w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            with pyro.plate("data", len(obs)):
                pyro.sample("obs", dist.Bernoulli(logits=(w * x).sum(-1)), obs=obs)

        x, obs = torch.randn(100, 2), torch.randint(0, 2, (100,)).float()
        guide = AutoMultivariateNormal(model)
        svi = SVI(model, guide, pyro.optim.SGD({"lr": 1.0}), NaturalGradient(lr=0.5, num_samples=8))
        for _ in range(20):
            svi.step(x, obs)

    :param float lr: the step size ρ in (0, 1].
    :param int num_samples: draws of q per expectation (0: at the mean).
    :param str curvature: ``"hessian"`` -- the exact Hessian at each draw
        (``d`` Hessian-vector products, batched over the draws), or
        ``"gradient"`` -- its Bonnet–Price estimate ``S (x − m) ∇ log p(x)ᵀ``
        (symmetrised), unbiased for ``E_q[∇² log p]`` from the gradients
        alone, so a step costs what a gradient step costs; noisier, so it
        wants a smaller ``lr`` (the correction keeps S positive definite).
    :param bool antithetic: draw an even ``num_samples`` in mirrored pairs
        ``m ± δ``, which cancels the gradient's noise exactly where log p is
        quadratic (ignored for odd ``num_samples``).
    :param float damping: added to the diagonal of the expected curvature.
    :param str correction: ``"auto"``, ``"always"`` or ``"never"`` — when to
        apply the improved rule's positive-definite correction.
    :param int elbo_particles: particles of the returned ELBO estimate when
        ``num_samples=0`` (the step's draws give it otherwise).
    """

    def __init__(self, lr: float = 0.5, num_samples: int = 1, *, curvature: str = "hessian",
                 antithetic: bool = True, damping: float = 0.0, correction: str = "auto",
                 elbo_particles: int = 1):
        if not (isinstance(lr, (int, float)) and 0 < lr <= 1):
            raise ValueError(f"lr must be in (0, 1], got {lr!r}")
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
        if not (isinstance(damping, (int, float)) and damping >= 0):
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if curvature not in ("hessian", "gradient"):
            raise ValueError(f"curvature must be 'hessian' or 'gradient', got {curvature!r}")
        if not isinstance(antithetic, bool):
            raise ValueError(f"antithetic must be True or False, got {antithetic!r}")
        if correction not in ("auto", "always", "never"):
            raise ValueError(f"correction must be 'auto', 'always' or 'never', got {correction!r}")
        super().__init__(num_particles=elbo_particles, vectorize_particles=True)
        self.lr, self.num_samples, self.damping = float(lr), num_samples, float(damping)
        self.correction, self.curvature = correction, curvature
        self.antithetic = antithetic and num_samples >= 2 and num_samples % 2 == 0
        self._layouts = weakref.WeakKeyDictionary()
        #: how many steps used the positive-definite correction
        self.num_corrected = 0

    # ------------------------------------------------------------ Pyro API
    def differentiable_loss(self, model, guide, *args, **kwargs):
        raise NotImplementedError(
            "NaturalGradient's step is not the gradient of a loss; use loss_and_grads "
            "(SVI with pyro.optim.SGD({'lr': 1.0}))"
        )

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        adapter = _adapter(guide)
        if self.num_samples == 0:  # no draws to estimate the ELBO from
            loss = self.loss(model, guide, *args, **kwargs)
        else:
            # one guide run (no model run): sets the guide up on the first
            # step, and shows its parameters to SVI, which steps what it sees
            with torch.no_grad():
                guide(*args, **kwargs)
        layout = self._layout(model, guide)
        try:
            with torch.no_grad():
                mean, precision = adapter.natural(layout)
            densities = self._densities(model, guide, layout, args, kwargs, mean)
            grad, hess, log_p = self._expectations(densities, mean, precision, adapter.diagonal)
            if self.num_samples > 0:
                loss = -(log_p.mean() + _entropy(precision, adapter.diagonal)).item()
            new_mean, new_precision = self.update(mean, precision, grad, hess, diagonal=adapter.diagonal)
            adapter.write_step(layout, new_mean, new_precision)
        except torch.linalg.LinAlgError as error:  # a covariance too ill-conditioned to factorise
            raise ValueError(
                f"NaturalGradient: the guide's covariance is numerically singular ({error}); "
                f"the curvature estimates are too noisy for lr={self.lr:g}: lower lr, raise "
                "num_samples or use curvature='hessian'"
            ) from error
        return loss

    # ------------------------------------------------------------ the rule
    def update(self, mean, precision, grad, hess, *, diagonal=False):
        """One step of the rule from ``(mean, precision)`` given the expected
        gradient ``grad`` and Hessian ``hess`` of log p (diagonals when
        ``diagonal``). Returns ``(new_mean, new_precision)``."""
        rho = self.lr
        target = -hess + self.damping * (1.0 if diagonal else torch.eye(len(mean), dtype=mean.dtype,
                                                                        device=mean.device))
        plain = (1 - rho) * precision + rho * target
        plain_ok = _is_pd(plain, diagonal)
        if self.correction == "never" and not plain_ok:
            raise ValueError(
                "NaturalGradient: the updated precision is not positive definite (log p is not "
                "concave over q); use correction='auto' or a smaller lr"
            )
        use_correction = self.correction == "always" or (self.correction == "auto" and not plain_ok)
        if use_correction:
            # S + ρG + ρ²/2 G S⁻¹ G = ½ S + ½ (S + ρG) S⁻¹ (S + ρG): written as
            # ½ S + ½ BᵀB with B = L⁻¹ (S + ρG), S = L Lᵀ, it is positive
            # definite in floating point too, however large G is
            step = precision + rho * (target - precision)
            if diagonal:
                new = 0.5 * precision + 0.5 * step * step / precision
            else:
                B = torch.linalg.solve_triangular(torch.linalg.cholesky(precision), step, upper=False)
                new = 0.5 * precision + 0.5 * B.T @ B
                new = 0.5 * (new + new.T)
            self.num_corrected += 1
        else:
            new = plain
        if not (torch.isfinite(new).all() and _is_pd(new, diagonal)):
            raise ValueError(
                f"NaturalGradient: the updated precision is not numerically positive definite "
                f"(curvature estimates too large or noisy for lr={self.lr:g}); lower lr, raise "
                "num_samples or use curvature='hessian'"
            )
        step = grad / new if diagonal else torch.linalg.solve(new, grad)
        return mean + rho * step, new

    def _draws(self, mean, precision, diagonal):
        """``(K, d)`` draws of q (the mean when ``num_samples == 0``), the
        second half mirroring the first when ``antithetic``."""
        if self.num_samples == 0:
            return mean.unsqueeze(0)
        K = self.num_samples
        half = K // 2 if self.antithetic else K
        eps = torch.randn((half,) + mean.shape, dtype=mean.dtype, device=mean.device)
        if self.antithetic:
            eps = torch.cat([eps, -eps])
        if diagonal:
            return mean + eps / precision.sqrt()
        L = torch.linalg.cholesky(precision)
        return mean + torch.linalg.solve_triangular(L.T, eps.T, upper=True).T

    def _expectations(self, densities, mean, precision, diagonal):
        """Monte Carlo averages of ∇ log p and of its curvature (the Hessian,
        or its Bonnet–Price estimate ``S (x − m) ∇ log p(x)ᵀ``) over draws,
        and log p at each draw."""
        points = self._draws(mean, precision, diagonal)
        log_density, batched = densities
        with torch.enable_grad():
            x = points.detach().clone().requires_grad_(True)
            values = batched(x) if batched is not None else torch.stack([log_density(p) for p in x.unbind()])
            (grads,) = torch.autograd.grad(values.sum(), x, create_graph=self.curvature == "hessian")
            if self.curvature == "hessian":
                # the Hessian of the sum is block diagonal in the points: the
                # j-th unit direction at every point gives row j of each
                d = mean.shape[-1]
                directions = torch.eye(d, dtype=mean.dtype, device=mean.device)
                directions = directions.unsqueeze(1).expand(d, len(points), d)
                (rows,) = torch.autograd.grad(grads, x, directions, is_grads_batched=True)
                hessians = rows.transpose(0, 1)  # (K, d, d)
        grads = grads.detach()
        if self.curvature == "hessian":
            hess = hessians.diagonal(dim1=-2, dim2=-1) if diagonal else 0.5 * (hessians + hessians.mT)
        else:
            delta = points - mean
            if diagonal:
                hess = precision * delta * grads
            else:
                outer = (delta @ precision).unsqueeze(-1) * grads.unsqueeze(-2)  # S δ ∇ᵀ
                hess = 0.5 * (outer + outer.mT)
        grad, hess = grads.mean(0), hess.mean(0)
        if not (torch.isfinite(grad).all() and torch.isfinite(hess).all()):
            raise ValueError("NaturalGradient: the gradient or Hessian of log p is not finite at the draws of q")
        return grad, hess, values.detach()

    def _densities(self, model, guide, layout, args, kwargs, mean):
        """``(log_density, batched)``: the per-point log density, and the
        vectorised one over many points when the model broadcasts under a
        plate of points (checked once per guide against the per-point one;
        ``None`` when it does not, so that draws are evaluated one by one)."""
        log_density = flat_log_density(model, layout, args, kwargs)
        if self.num_samples <= 1:
            return log_density, None
        state = self._layouts[guide]
        if state.get("batched_ok") is False:
            return log_density, None
        if math.isinf(self.max_plate_nesting):  # guessed by Trace_ELBO's first loss call
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        batched = batched_log_density(model, layout, args, kwargs, self.max_plate_nesting)
        if "batched_ok" not in state:
            generator = torch.Generator(device=mean.device).manual_seed(0)
            probe = mean + 0.1 * torch.randn((2,) + mean.shape, generator=generator,
                                             dtype=mean.dtype, device=mean.device)
            try:
                with torch.no_grad():
                    ok = torch.allclose(batched(probe), torch.stack([log_density(p) for p in probe]),
                                        rtol=1e-6, atol=1e-6)
            except Exception:  # a model that does not broadcast over the points
                ok = False
            state["batched_ok"] = ok
            if not ok:
                return log_density, None
        return log_density, batched

    def _layout(self, model, guide):
        state = self._layouts.get(guide)
        if state is None or state["model"] is not model:
            state = {"model": model, "layout": FlatLayout.from_trace(guide.prototype_trace)}
            self._layouts[guide] = state
        return state["layout"]


# ------------------------------------------------------------ guide adapters
def _adapter(guide):
    if isinstance(guide, AutoMultivariateNormal):
        return _FullAdapter(guide)
    if isinstance(guide, (AutoNormal, AutoDiagonalNormal)):
        return _DiagonalAdapter(guide)
    raise ValueError(
        "NaturalGradient updates AutoMultivariateNormal, AutoNormal and AutoDiagonalNormal "
        f"guides; got {type(guide).__name__}"
    )


class _FullAdapter:
    diagonal = False

    def __init__(self, guide):
        self.guide = guide

    def natural(self, layout):
        q = gaussian_view(self.guide, layout)
        self.perm = q.perm
        mean, cov = q.moments()
        L = cov.factor
        precision = torch.cholesky_inverse(torch.linalg.cholesky(L @ L.T))
        return mean, 0.5 * (precision + precision.T)

    def write_step(self, layout, mean, precision):
        g = self.guide
        inverse = torch.empty_like(self.perm)
        inverse[self.perm] = torch.arange(len(self.perm), device=self.perm.device)
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        L = torch.linalg.cholesky(cov[inverse][:, inverse])
        scale = L.diagonal()
        _set_step(g, "loc", mean[inverse])
        _set_step(g, "scale", scale)
        _set_step(g, "scale_tril", L / scale.unsqueeze(-1))


class _DiagonalAdapter:
    diagonal = True

    def __init__(self, guide):
        self.guide = guide

    def natural(self, layout):
        q = gaussian_view(self.guide, layout)
        self.view = q
        mean, cov = q.moments()
        return mean, 1.0 / cov.var

    def write_step(self, layout, mean, precision):
        scale = precision.rsqrt()
        g = self.guide
        if isinstance(g, AutoDiagonalNormal):
            perm = self.view.perm
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm), device=perm.device)
            _set_step(g, "loc", mean[inverse])
            _set_step(g, "scale", scale[inverse])
            return
        locs, scales = layout.unpack(mean), layout.unpack(scale)
        for name in locs:
            _set_step(g.locs, name, locs[name])
            _set_step(g.scales, name, scales[name])


def _set_step(module, name, value):
    """Write minus the change from the current value into the unconstrained
    parameter's ``.grad``, so that SGD with lr 1 lands on ``value``."""
    constrained = getattr(module, name)
    unconstrained = module._parameters.get(name + "_unconstrained")
    if unconstrained is None:
        unconstrained = module._parameters[name]
        target = value.detach()
    else:
        constraint = module._pyro_params[name][0]
        target = torch.distributions.transform_to(constraint).inv(value.detach())
    del constrained
    if not torch.isfinite(target).all():
        raise ValueError(f"NaturalGradient: the new value of '{name}' is not finite")
    unconstrained.grad = (unconstrained.detach() - target.reshape(unconstrained.shape)).clone()


def _entropy(precision, diagonal):
    """Entropy of a Gaussian with this precision (a diagonal one: its diagonal)."""
    d = precision.shape[-1]
    log_det = precision.log().sum() if diagonal else 2 * torch.linalg.cholesky(precision).diagonal().log().sum()
    return 0.5 * d * (1.0 + math.log(2 * math.pi)) - 0.5 * log_det


def _is_pd(matrix, diagonal):
    if diagonal:
        return bool((matrix > 0).all())
    return torch.linalg.cholesky_ex(matrix).info.item() == 0
