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

from .gaussian import FlatLayout, flat_log_density, gaussian_view


class NaturalGradient(pyro.infer.Trace_ELBO):
    r"""The Bayesian learning rule as a Pyro loss whose gradient is the step.

    ``loss_and_grads`` estimates E_q[∇ log p] and E_q[∇² log p], forms the
    new mean and precision, and writes minus the change of each guide
    parameter into its ``.grad``; apply it with
    ``pyro.optim.SGD({"lr": 1.0})`` (the step size is ``lr`` here). The
    returned loss is the usual single-sample ``-ELBO`` estimate at the
    parameters before the step.

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
    :param float damping: added to the diagonal of the expected curvature.
    :param str correction: ``"auto"``, ``"always"`` or ``"never"`` — when to
        apply the improved rule's positive-definite correction.
    :param int elbo_particles: particles of the returned ELBO estimate.
    """

    def __init__(self, lr: float = 0.5, num_samples: int = 1, *, damping: float = 0.0,
                 correction: str = "auto", elbo_particles: int = 1):
        if not (isinstance(lr, (int, float)) and 0 < lr <= 1):
            raise ValueError(f"lr must be in (0, 1], got {lr!r}")
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
        if not (isinstance(damping, (int, float)) and damping >= 0):
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if correction not in ("auto", "always", "never"):
            raise ValueError(f"correction must be 'auto', 'always' or 'never', got {correction!r}")
        super().__init__(num_particles=elbo_particles, vectorize_particles=True)
        self.lr, self.num_samples, self.damping = float(lr), num_samples, float(damping)
        self.correction = correction
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
        loss = self.loss(model, guide, *args, **kwargs)
        adapter = _adapter(guide)
        layout = self._layout(model, guide)
        log_density = flat_log_density(model, layout, args, kwargs)
        with torch.no_grad():
            mean, precision = adapter.natural(layout)
        grad, hess = self._expectations(log_density, mean, precision, adapter.diagonal)
        new_mean, new_precision = self.update(mean, precision, grad, hess, diagonal=adapter.diagonal)
        adapter.write_step(layout, new_mean, new_precision)
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
            G = target - precision
            if diagonal:
                new = precision + rho * G + 0.5 * rho**2 * G * G / precision
            else:
                new = precision + rho * G + 0.5 * rho**2 * G @ torch.linalg.solve(precision, G)
                new = 0.5 * (new + new.T)
            self.num_corrected += 1
        else:
            new = plain
        step = grad / new if diagonal else torch.linalg.solve(new, grad)
        return mean + rho * step, new

    def _expectations(self, log_density, mean, precision, diagonal):
        if self.num_samples == 0:
            points = mean.unsqueeze(0)
        else:
            if diagonal:
                eps = torch.randn((self.num_samples,) + mean.shape, dtype=mean.dtype, device=mean.device)
                points = mean + eps / precision.sqrt()
            else:
                L = torch.linalg.cholesky(precision)
                eps = torch.randn((self.num_samples,) + mean.shape, dtype=mean.dtype, device=mean.device)
                points = mean + torch.linalg.solve_triangular(L.T, eps.T, upper=True).T
        grads, hessians = [], []
        eye = torch.eye(len(mean), dtype=mean.dtype, device=mean.device)
        for x in points:
            with torch.enable_grad():
                x = x.detach().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(log_density(x), x, create_graph=True)
                (H,) = torch.autograd.grad(g, x, eye, is_grads_batched=True)
            grads.append(g.detach())
            hessians.append(H.diagonal() if diagonal else 0.5 * (H + H.T))
        grad, hess = torch.stack(grads).mean(0), torch.stack(hessians).mean(0)
        if not (torch.isfinite(grad).all() and torch.isfinite(hess).all()):
            raise ValueError("NaturalGradient: the gradient or Hessian of log p is not finite at the draws of q")
        return grad, hess

    def _layout(self, model, guide):
        cached = self._layouts.get(guide)
        if cached is None or cached[0] is not model:
            cached = (model, FlatLayout.from_trace(guide.prototype_trace))
            self._layouts[guide] = cached
        return cached[1]


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


def _is_pd(matrix, diagonal):
    if diagonal:
        return bool((matrix > 0).all())
    return torch.linalg.cholesky_ex(matrix).info.item() == 0
