"""The eight-schools model (centred), its data and reference values.

Not a test file: a module shared by tests and benchmarks.

Data: the SAT coaching experiments of Rubin (1981), "Estimation in parallel
randomized experiments", J. Educ. Statist. 6, 377-401; as in Gelman et al.,
*Bayesian Data Analysis* (3rd ed.), §5.5: estimated effects ``Y`` and their
standard errors ``SIGMA`` for 8 schools.

Model (the classic centred funnel, as curvi users write it)::

    mu ~ Normal(0, 5),  tau ~ HalfCauchy(5),
    theta_j ~ Normal(mu, tau),  y_j ~ Normal(theta_j, sigma_j),  j = 1..8.

:func:`model` broadcasts over a leading particle plate (``mu`` and ``tau``
have shape ``(K, 1)`` under ``Trace_ELBO(vectorize_particles=True)``; the
schools plate is at ``dim=-1``), so it runs under curvi's default loss and
``curvi.AmortizedLaplaceGuide(model, unit_plate="schools")``.

Reference values (float64; recomputed by :func:`reference_values`, and
:func:`amortized_guide_best_elbo` for the last one):

* ``LOG_EVIDENCE`` = log p(y). θ integrated out exactly (y_j | μ, τ ~
  N(μ, σ_j² + τ²)), then 2-D trapezoid quadrature over (μ, u = log τ) on
  μ ∈ [-60, 70], u ∈ [-25, 15] with 1301 × 1601 nodes (the integrand is
  smooth and decays fast, so the trapezoid rule converges geometrically; a
  grid half as fine and a 1-D quadrature over u with μ integrated
  analytically agree to < 1e-9).
* ``BEST_GAUSSIAN_ELBO`` = max over Gaussian q(μ, u) of
  E_q[log p(y | μ, τ) + log p(μ) + log p(τ) + u] + H[q]: the best ELBO of
  the family "Gaussian q(μ, log τ) times the exact conditional p(θ | μ, τ, y)"
  (for that family the θ part of the ELBO is exactly log p(y | μ, τ)).
  Expectation by 64 × 64-node Gauss–Hermite on the 2-D Gaussian, maximised
  over its mean and Cholesky factor (log-diagonal) by torch L-BFGS (strong
  Wolfe); 32 × 32 nodes agree to < 1e-7. The issue's −31.31 and −31.40
  are these values rounded.
* ``AMORTIZED_GUIDE_BEST_ELBO`` = max over θ̂ = (μ̂, log τ̂) of the ELBO of
  ``curvi.AmortizedLaplaceGuide(model, unit_plate="schools")`` (default joint
  precision, softabs repair). That guide's family is much narrower than the
  one above: θ̂ is its only parameter, q(μ, log τ) = N(θ̂, S(θ̂)⁻¹) with S
  the (repaired) joint Schur complement at θ̂, and q(θ | μ, τ) has the
  *fixed* precision D(θ̂) = 1/τ̂² + 1/σ² and the mean ŷ − M ((μ, log τ) − θ̂),
  linear in log τ, whereas the exact conditional's precision is
  1/τ² + 1/σ² at the drawn τ. A draw of τ well below τ̂ then pays
  −Σ_j (1/D_j + (m_j − μ)²) / (2τ²), so the ELBO holds a term
  ∝ −E_q[exp(−2 log τ)] = −exp(−2 log τ̂ + 2 Var_q(log τ)): it is
  astronomically negative (−1.8e5 at the guide's starting point, the Laplace
  marginal mode; −1e18 at τ̂ = e²) unless q(log τ) is narrow, which S gives
  only for τ̂ ≳ 20. Given S, ŷ, M, D from the guide, θ | (μ, log τ) is
  integrated analytically (the model is Gaussian in θ) and (μ, log τ) by
  64 × 64-node Gauss–Hermite (128 × 128 agree to 1e-12): a deterministic
  function of θ̂, maximised by a grid search then Nelder–Mead
  (:func:`amortized_guide_best_elbo`). Checked by plain Monte Carlo with the
  guide and ``Trace_ELBO`` particles (``curvi.FixedNoise``, antithetic):
  −39.563 ± 0.038 with 131 072 particles. Note the heavy left tail of the
  particle ELBOs (the worst antithetic pair mean was −673): smaller samples
  are biased upwards (16 384 particles gave −39.365 ± 0.060, 3 "SEs" high).
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from curvi.guides import laplace_gaussian

__all__ = [
    "Y",
    "SIGMA",
    "NUM_SCHOOLS",
    "LOG_EVIDENCE",
    "BEST_GAUSSIAN_ELBO",
    "BEST_GAUSSIAN_MEAN",
    "BEST_GAUSSIAN_COV",
    "AMORTIZED_GUIDE_BEST_ELBO",
    "AMORTIZED_GUIDE_BEST_ELBO_MC",
    "AMORTIZED_GUIDE_BEST_ELBO_SE",
    "AMORTIZED_GUIDE_BEST_THETA",
    "AMORTIZED_MARGINAL_GUIDE_BEST_ELBO",
    "AMORTIZED_MARGINAL_GUIDE_BEST_THETA",
    "model",
    "make_eight_schools",
    "log_marginal_likelihood",
    "reference_values",
    "amortized_guide_elbo",
    "amortized_guide_best_elbo",
]

#: estimated coaching effects (SAT-V points)
Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
#: their standard errors
SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)
NUM_SCHOOLS = 8

#: log p(y) (2-D quadrature; see the module docstring): -31.311347352
LOG_EVIDENCE = -31.311347
#: best ELBO of Gaussian q(μ, log τ) × exact p(θ | μ, τ, y): -31.395233631
#: (0.084 nats below LOG_EVIDENCE)
BEST_GAUSSIAN_ELBO = -31.395234
#: its optimal mean and covariance of (μ, log τ)
BEST_GAUSSIAN_MEAN = (4.4070, 0.8997)
BEST_GAUSSIAN_COV = ((10.8145, -0.2453), (-0.2453, 0.8128))
#: best ELBO of AmortizedLaplaceGuide(model, unit_plate="schools") with its
#: defaults (global_precision="joint", repair="softabs"): 8.15 nats below
#: BEST_GAUSSIAN_ELBO. The value is the semi-analytic ELBO at the maximiser
#: (see amortized_guide_best_elbo); AMORTIZED_GUIDE_BEST_ELBO_MC is a
#: 131 072-particle antithetic Monte Carlo estimate there (FixedNoise seeds
#: 5000-5031), and AMORTIZED_GUIDE_BEST_ELBO_SE its standard error.
AMORTIZED_GUIDE_BEST_ELBO = -39.550
AMORTIZED_GUIDE_BEST_ELBO_MC = -39.563
AMORTIZED_GUIDE_BEST_ELBO_SE = 0.038
#: the maximising θ̂ = (μ̂, log τ̂) (τ̂ = 27.2; a flat ridge in μ̂: ±0.5 costs 0.012 nats)
AMORTIZED_GUIDE_BEST_THETA = (-3.680, 3.3046)
#: the same for global_precision="marginal": -34.349 at θ̂ = (4.632, 2.325)
#: (τ̂ = 10.2), 2.95 nats below BEST_GAUSSIAN_ELBO
AMORTIZED_MARGINAL_GUIDE_BEST_ELBO = -34.349
AMORTIZED_MARGINAL_GUIDE_BEST_THETA = (4.632, 2.325)


def make_eight_schools(dtype=torch.float64):
    """``(model, (y, sigma), "schools")`` in ``dtype``, as tests/models.py's
    ``make_*``: call ``model(y, sigma)``."""
    return model, (torch.tensor(Y, dtype=dtype), torch.tensor(SIGMA, dtype=dtype)), "schools"


def model(y, sigma):
    """Centred eight schools; ``y`` and ``sigma`` are ``(8,)`` tensors."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("schools", y.shape[-1], dim=-1):
        # mu, tau: () alone, (K, 1) under a particle plate at dim -2
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


# ---------------------------------------------------------------------------
# reference computations (deterministic; float64)


def _log_prior_u(mu, u):
    """log p(μ) + log p(τ) + log|dτ/du| at τ = exp(u)."""
    log_p_mu = -0.5 * (mu / 5.0) ** 2 - math.log(5.0) - 0.5 * math.log(2 * math.pi)
    tau = u.exp()
    log_p_tau = math.log(2.0 / (math.pi * 5.0)) - torch.log1p((tau / 5.0) ** 2)
    return log_p_mu + log_p_tau + u


def _log_lik_integrated(mu, u, y, sigma):
    """log p(y | μ, τ) with θ integrated out: Σ_j log N(y_j; μ, σ_j² + τ²).
    ``mu`` and ``u`` broadcast together; y, sigma along a new last axis."""
    var = sigma**2 + (2 * u).exp().unsqueeze(-1)
    r = y - mu.unsqueeze(-1)
    return (-0.5 * r**2 / var - 0.5 * var.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def _log_joint_integrated(mu, u, y, sigma):
    return _log_lik_integrated(mu, u, y, sigma) + _log_prior_u(mu, u)


def log_marginal_likelihood(n_mu=1301, n_u=1601, mu_range=(-60.0, 70.0), u_range=(-25.0, 15.0)):
    """log p(y) by 2-D trapezoid quadrature over (μ, log τ)."""
    y, sigma = (torch.tensor(v, dtype=torch.float64) for v in (Y, SIGMA))
    mu = torch.linspace(*mu_range, n_mu, dtype=torch.float64)
    u = torch.linspace(*u_range, n_u, dtype=torch.float64)
    f = _log_joint_integrated(mu[:, None], u[None, :], y, sigma)
    w_mu = torch.full((n_mu,), (mu_range[1] - mu_range[0]) / (n_mu - 1), dtype=torch.float64)
    w_u = torch.full((n_u,), (u_range[1] - u_range[0]) / (n_u - 1), dtype=torch.float64)
    w_mu[[0, -1]] /= 2
    w_u[[0, -1]] /= 2
    logw = w_mu.log()[:, None] + w_u.log()[None, :]
    return torch.logsumexp((f + logw).reshape(-1), 0).item()


def _log_marginal_likelihood_1d(n_u=4001, u_range=(-25.0, 15.0)):
    """log p(y) with μ integrated analytically (a Gaussian integral) and a
    1-D trapezoid rule over log τ: a check on :func:`log_marginal_likelihood`."""
    y, sigma = (torch.tensor(v, dtype=torch.float64) for v in (Y, SIGMA))
    u = torch.linspace(*u_range, n_u, dtype=torch.float64)
    var = sigma**2 + (2 * u).exp().unsqueeze(-1)  # (n_u, 8)
    prec = (1 / var).sum(-1) + 1 / 25.0  # precision of μ | τ, y
    b = (y / var).sum(-1)
    # ∫ Π N(y_j; μ, v_j) N(μ; 0, 25) dμ
    log_int = (
        -0.5 * (y**2 / var).sum(-1)
        + 0.5 * b**2 / prec
        - 0.5 * prec.log()
        - 0.5 * var.log().sum(-1)
        - 0.5 * len(Y) * math.log(2 * math.pi)
        - math.log(5.0)
    )
    tau = u.exp()
    log_p = log_int + math.log(2.0 / (math.pi * 5.0)) - torch.log1p((tau / 5.0) ** 2) + u
    w = torch.full((n_u,), (u_range[1] - u_range[0]) / (n_u - 1), dtype=torch.float64)
    w[[0, -1]] /= 2
    return torch.logsumexp(log_p + w.log(), 0).item()


def _gauss_hermite_2d(n):
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(n)
    z = torch.tensor(x * math.sqrt(2.0), dtype=torch.float64)
    w = torch.tensor(w / math.sqrt(math.pi), dtype=torch.float64)
    Z = torch.stack(torch.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    W = (w[:, None] * w[None, :]).reshape(-1)
    return Z, W


def _gaussian_elbo(params, Z, W, y, sigma):
    m, (l11, l21, l22) = params[:2], params[2:]
    L = torch.stack([torch.stack([l11.exp(), l11 * 0]), torch.stack([l21, l22.exp()])])
    x = m + Z @ L.T
    f = _log_joint_integrated(x[:, 0], x[:, 1], y, sigma)
    entropy = 1.0 + math.log(2 * math.pi) + l11 + l22
    return (W * f).sum() + entropy


def best_gaussian_elbo(n=64, start=None):
    """max over Gaussian q(μ, log τ) of the ELBO with θ integrated out exactly
    (Gauss–Hermite with ``n`` nodes per axis, torch L-BFGS). Returns
    ``(elbo, mean, cov)``."""
    y, sigma = (torch.tensor(v, dtype=torch.float64) for v in (Y, SIGMA))
    Z, W = _gauss_hermite_2d(n)
    if start is None:
        start = torch.tensor([4.0, 1.0, math.log(3.0), 0.0, 0.0], dtype=torch.float64)
    params = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = -_gaussian_elbo(params, Z, W, y, sigma)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    with torch.no_grad():
        elbo = _gaussian_elbo(params, Z, W, y, sigma).item()
        l11, l21, l22 = params[2:]
        L = torch.tensor([[l11.exp(), 0.0], [l21, l22.exp()]], dtype=torch.float64)
    return elbo, params[:2].detach().clone(), L @ L.T


def reference_values():
    """Recompute ``LOG_EVIDENCE`` and ``BEST_GAUSSIAN_ELBO`` (a few seconds)
    with their cross-checks: a dict."""
    elbo, mean, cov = best_gaussian_elbo(64)
    elbo_coarse, _, _ = best_gaussian_elbo(32)
    return {
        "log_evidence": log_marginal_likelihood(),
        "log_evidence_half_grid": log_marginal_likelihood(651, 801),
        "log_evidence_1d": _log_marginal_likelihood_1d(),
        "best_gaussian_elbo": elbo,
        "best_gaussian_elbo_32": elbo_coarse,
        "best_gaussian_mean": mean,
        "best_gaussian_cov": cov,
    }


def _amortized_guide_parts(guide, theta_hat, y, sigma):
    """(θ̂, ŷ, S, M, D) of ``guide`` with its mean set to ``theta_hat``."""

    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(torch.as_tensor(theta_hat, dtype=torch.float64))
    if getattr(guide, "global_precision", "joint") == "marginal":
        guide.marginal_count.zero_()  # the marginal curvature at θ̂ itself, not a cached one
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(guide).get_trace(y, sigma)
    q = laplace_gaussian(trace).detach()
    return q.theta_hat, q.y_hat[:, 0], q.global_precision, q.M[:, 0, :], q.local_precision[:, 0, 0]


def amortized_guide_elbo(guide, theta_hat, n=64):
    """The ELBO of an eight-schools ``AmortizedLaplaceGuide`` at ``theta_hat``
    (unconstrained (μ̂, log τ̂)), without Monte Carlo: θ | (μ, log τ)
    analytically under the guide's Gaussian conditional, (μ, log τ) by
    ``n × n`` Gauss–Hermite under q = N(θ̂, S⁻¹). Sets the guide's θ̂."""
    y, sigma = (torch.tensor(v, dtype=torch.float64) for v in (Y, SIGMA))
    th, yh, S, M, D = _amortized_guide_parts(guide, theta_hat, y, sigma)
    Z, W = _gauss_hermite_2d(n)
    C = torch.linalg.inv(S)
    x = th + Z @ torch.linalg.cholesky(C).T  # nodes for (μ, u)
    mu, u = x[:, 0], x[:, 1]
    m = yh - (x - th) @ M.T  # conditional means of θ_j, (Q, 8)
    v = 1.0 / D  # conditional variances
    log_p_theta = (
        -0.5 * math.log(2 * math.pi)
        - u[:, None]
        - ((m - mu[:, None]) ** 2 + v) / (2 * (2 * u).exp()[:, None])
    ).sum(-1)
    log_p_y = (-0.5 * math.log(2 * math.pi) - sigma.log() - ((y - m) ** 2 + v) / (2 * sigma**2)).sum(-1)
    entropy = (
        (0.5 * (2 * math.pi * math.e * v).log()).sum() + 1.0 + math.log(2 * math.pi) + 0.5 * torch.logdet(C)
    )
    return ((W * (log_p_theta + log_p_y + _log_prior_u(mu, u))).sum() + entropy).item()


def amortized_guide_best_elbo(global_precision="joint"):
    """Maximise :func:`amortized_guide_elbo` over θ̂: a grid over
    μ̂ ∈ [-12, 16], log τ̂ ∈ [-1, 6], then Nelder–Mead. Returns
    ``(elbo, theta_hat)``. Clears Pyro's param store (about a minute)."""
    import curvi

    pyro.clear_param_store()
    m, args, plate = make_eight_schools()
    guide = curvi.AmortizedLaplaceGuide(m, unit_plate=plate, global_precision=global_precision)
    guide(*args)

    def f(th):
        return amortized_guide_elbo(guide, th)

    grid = [(a, b) for a in torch.linspace(-12, 16, 29).tolist() for b in torch.linspace(-1, 6, 36).tolist()]
    start = max(grid, key=f)
    pts = [torch.tensor(start, dtype=torch.float64)]
    pts += [pts[0] + 0.5 * torch.eye(2, dtype=torch.float64)[i] for i in range(2)]
    vals = [f(p) for p in pts]
    for _ in range(300):
        order = sorted(range(3), key=lambda i: -vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[0] - vals[2] < 1e-10 and (pts[2] - pts[0]).norm() < 1e-7:
            break
        c = (pts[0] + pts[1]) / 2
        xr = c + (c - pts[2])
        fr = f(xr)
        if fr > vals[0]:
            xe = c + 2 * (c - pts[2])
            fe = f(xe)
            pts[2], vals[2] = (xe, fe) if fe > fr else (xr, fr)
        elif fr > vals[1]:
            pts[2], vals[2] = xr, fr
        else:
            xc = c + 0.5 * (pts[2] - c)
            fc = f(xc)
            if fc > vals[2]:
                pts[2], vals[2] = xc, fc
            else:
                for i in (1, 2):
                    pts[i] = pts[0] + 0.5 * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
    i = max(range(3), key=lambda i: vals[i])
    return vals[i], tuple(pts[i].tolist())
