"""Small hierarchical models with data, shared by the tests.

Each ``make_*`` returns ``(model, args, unit_plate)`` in float64.
"""

import pyro
import pyro.distributions as dist
import torch


def make_logistic_long(num_groups=7, seed=0):
    """Logistic random intercept + slope in long format: one observation plate
    whose rows index their group, groups of unequal size."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (num_groups,), generator=g)
    group = torch.repeat_interleave(torch.arange(num_groups), sizes)
    x = torch.randn(group.shape[0], generator=g, dtype=torch.float64)
    obs = torch.bernoulli(torch.sigmoid(0.3 - 0.5 * x), generator=g)

    def model(x, group, obs):
        beta = pyro.sample("beta", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
        with pyro.plate("groups", num_groups):
            u = pyro.sample("u", dist.Normal(0.0, sigma).to_event(1))
        eta = beta[..., 0] + u[..., group, 0] + (beta[..., 1] + u[..., group, 1]) * x
        with pyro.plate("obs", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=eta), obs=obs)

    return model, (x, group, obs), "groups"


def make_poisson_vector(num_groups=5, num_obs=4, dim=3, seed=1):
    """Poisson counts; the unit latent is a vector (event dim 1) and the
    observations sit in a plate nested inside the unit plate."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(num_groups, num_obs, dim, generator=g, dtype=torch.float64)
    counts = torch.poisson(torch.full((num_groups, num_obs), 2.0, dtype=torch.float64), g)

    def model(X, counts):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5).expand([dim]).to_event(1))
        with pyro.plate("groups", X.shape[0], dim=-2):
            w = pyro.sample("w", dist.Normal(0.0, tau).to_event(1))  # (N, 1, dim)
            rate = (mu + (X * w).sum(-1)).exp()  # (N, num_obs)
            with pyro.plate("obs", X.shape[1], dim=-1):
                pyro.sample("c", dist.Poisson(rate), obs=counts)

    return model, (X, counts), "groups"


def make_lkj(num_groups=6, num_obs=3, seed=2):
    """Correlated random intercept and slope through an LKJ Cholesky factor
    and positive scales; a positive per-unit noise scale as a second,
    constrained local site."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_groups, num_obs, generator=g, dtype=torch.float64)
    obs = torch.randn(num_groups, num_obs, generator=g, dtype=torch.float64) + x

    def model(x, obs):
        L = pyro.sample("L", dist.LKJCholesky(2, 1.5))
        sigma = pyro.sample("sigma", dist.HalfCauchy(1.0).expand([2]).to_event(1))
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        scale_tril = sigma.unsqueeze(-1) * L
        with pyro.plate("groups", x.shape[0], dim=-2):
            u = pyro.sample(
                "u", dist.MultivariateNormal(torch.zeros(2, dtype=x.dtype), scale_tril=scale_tril)
            )
            s = pyro.sample("s", dist.LogNormal(0.0, 0.3))
            with pyro.plate("obs", x.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(mu + u[..., 0] + u[..., 1] * x, s), obs=obs)

    return model, (x, obs), "groups"


def make_nested_latent(num_groups=4, num_items=3, num_obs=2, seed=3):
    """A latent in a plate nested inside the unit plate (per unit and item),
    next to a scalar per-unit latent; observations nested deeper still."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(num_groups, num_items, num_obs, generator=g, dtype=torch.float64)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.Gamma(2.0, 2.0))
        with pyro.plate("groups", obs.shape[0], dim=-3):
            a = pyro.sample("a", dist.Normal(mu, tau))  # (N, 1, 1)
            with pyro.plate("items", obs.shape[1], dim=-2):
                b = pyro.sample("b", dist.Normal(a, 0.5))  # (N, J, 1)
                with pyro.plate("obs", obs.shape[2], dim=-1):
                    pyro.sample("z", dist.Normal(b, 1.0), obs=obs)

    return model, (obs,), "groups"


def make_gaussian(num_groups=6, num_obs=3, seed=4):
    """Linear-Gaussian random intercepts with fixed scales: the log density is
    quadratic, so its Hessian is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(num_groups, num_obs, generator=g, dtype=torch.float64)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("groups", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 0.7))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

    return model, (obs,), "groups"


MODELS = {
    "logistic_long": make_logistic_long,
    "poisson_vector": make_poisson_vector,
    "lkj": make_lkj,
    "nested_latent": make_nested_latent,
    "gaussian": make_gaussian,
}


def make_linear_gaussian(num_groups=5, num_obs=3, seed=5, subsample_size=None):
    """Linear-Gaussian hierarchy with fixed scales: the log joint is quadratic,
    so the Laplace guide at the posterior mean is the exact posterior.

    Returns ``(model, args, plate, exact)`` with ``exact`` holding the
    posterior mean and precision over (mu, b, u) and the log evidence.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_groups, num_obs, generator=g, dtype=torch.float64)
    obs = torch.randn(num_groups, num_obs, generator=g, dtype=torch.float64) + 0.5 * x + 1.0
    prior_mu, prior_b, tau, sigma = 3.0, 2.0, 0.8, 0.6

    def model(x, obs):
        mu = pyro.sample("mu", dist.Normal(0.0, prior_mu))
        b = pyro.sample("b", dist.Normal(0.0, prior_b))
        with pyro.plate("groups", num_groups, subsample_size=subsample_size, dim=-2) as idx:
            u = pyro.sample("u", dist.Normal(mu, tau))
            with pyro.plate("obs", num_obs, dim=-1):
                pyro.sample("z", dist.Normal(u + b * x[idx], sigma), obs=obs[idx])

    # z = A (mu, b, u) + noise, (mu, b, u) ~ N(0, C): exact posterior and evidence
    n = num_groups
    C = torch.zeros(2 + n, 2 + n, dtype=torch.float64)
    C[0, 0], C[1, 1] = prior_mu**2, prior_b**2
    C[2:, 2:] = tau**2 * torch.eye(n) + prior_mu**2  # u = mu + tau * e
    C[0, 2:] = C[2:, 0] = prior_mu**2
    A = torch.zeros(n * num_obs, 2 + n, dtype=torch.float64)
    A[:, 1] = x.reshape(-1)
    A[torch.arange(n * num_obs), 2 + torch.arange(n).repeat_interleave(num_obs)] = 1.0
    noise = sigma**2 * torch.eye(n * num_obs, dtype=torch.float64)
    precision = torch.linalg.inv(C) + A.T @ A / sigma**2
    mean = torch.linalg.solve(precision, A.T @ obs.reshape(-1) / sigma**2)
    evidence = dist.MultivariateNormal(torch.zeros(n * num_obs, dtype=torch.float64), A @ C @ A.T + noise)
    exact = {"mean": mean, "precision": precision, "log_evidence": evidence.log_prob(obs.reshape(-1))}
    return model, (x, obs), "groups", exact
