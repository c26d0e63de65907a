"""Shared model and data of the benchmarks: a hierarchical logistic regression.

4 globals -- ``beta`` (intercept and slope, Normal(0, 5)) and ``sigma`` (the
two random-effect sds, HalfNormal(1)) -- and a random intercept and slope per
group, ``u`` of shape ``(N, 1, 2)`` inside ``pyro.plate("groups", N, dim=-2)``,
with ``OBS_PER_GROUP`` Bernoulli observations per group in a nested plate
(dim -1). Simulated with beta = (-0.5, 0.8), sigma = (1.0, 0.5).

* :func:`simulate` -- design, responses and true values as numpy arrays, so
  that torch and jax read the same data;
* :func:`torch_model` -- the Pyro model (centred: ``u ~ Normal(0, sigma)``);
* :func:`numpyro_model` -- the same model in NumPyro;
* :func:`numpyro_model_noncentred` -- ``u = sigma * z`` with ``z ~ Normal(0, 1)``:
  the same posterior over (beta, sigma), without the funnel, for NUTS.

The models index ``beta[..., j]`` (not ``beta[j]``) so that they broadcast
under a particle plate (``Trace_ELBO(vectorize_particles=True)``,
``Predictive(parallel=True)``); unbatched, the two are the same.

Imported by the scripts of this folder (``python benchmarks/<name>.py`` puts
the folder on ``sys.path``).
"""

from __future__ import annotations

OBS_PER_GROUP = 10


def simulate(num_groups, seed=0):
    """Design, responses and true values (numpy, so both torch and jax read them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    beta, sigma = np.array([-0.5, 0.8]), np.array([1.0, 0.5])
    u = rng.normal(size=(num_groups, 1, 2)) * sigma
    x = rng.normal(size=(num_groups, OBS_PER_GROUP))
    eta = beta[..., 0] + u[..., 0] + (beta[..., 1] + u[..., 1]) * x
    y = (rng.uniform(size=eta.shape) < 1 / (1 + np.exp(-eta))).astype(np.float64)
    theta = np.concatenate([beta, np.log(sigma)])  # unconstrained globals
    probe = rng.normal(size=4 + 2 * num_groups)  # the v of H·v
    return x, y, theta, u.reshape(num_groups, 2), probe


def torch_model(x, y):
    import pyro
    import pyro.distributions as dist

    beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    with pyro.plate("groups", x.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma).to_event(1))  # (N, 1, 2)
        eta = beta[..., 0] + u[..., 0] + (beta[..., 1] + u[..., 1]) * x
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=eta), obs=y)


def numpyro_model(x, y):
    import numpyro
    import numpyro.distributions as dist

    beta = numpyro.sample("beta", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    with numpyro.plate("groups", x.shape[0], dim=-2):
        u = numpyro.sample("u", dist.Normal(0.0, sigma).to_event(1))
        eta = beta[..., 0] + u[..., 0] + (beta[..., 1] + u[..., 1]) * x
        with numpyro.plate("obs", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)


def numpyro_model_noncentred(x, y):
    """:func:`numpyro_model` with ``u = sigma * z``, ``z ~ Normal(0, 1)``: the
    same joint over (beta, sigma, u), hence the same posterior over (beta, sigma)."""
    import numpyro
    import numpyro.distributions as dist

    beta = numpyro.sample("beta", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    with numpyro.plate("groups", x.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
        u = z * sigma
        eta = beta[..., 0] + u[..., 0] + (beta[..., 1] + u[..., 1]) * x
        with numpyro.plate("obs", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)


def curvi_revision():
    """HEAD's short hash and the files under curvi/ that differ from it (a
    benchmark imports the work tree), for the results' header."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "curvi"], cwd=root, capture_output=True, text=True
        ).stdout.splitlines()
    except OSError:
        return "curvi revision unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    text = f"curvi at {head or '?'}"
    if changed:
        text += f" with uncommitted changes in {', '.join(changed)}"
    return text


def r_probe():
    """R's version and which of glmmTMB and lme4 load: (version text,
    {package: None or why it is missing}); a missing peer is skipped with
    that message, not faked."""
    import shutil
    import subprocess

    if shutil.which("Rscript") is None:
        reason = "Rscript not found on PATH (apt-get install r-base r-cran-glmmtmb r-cran-lme4)"
        return None, {"glmmTMB": reason, "lme4": reason}
    code = (
        'cat("VERSION R ", R.version$major, ".", R.version$minor, "\\n", sep = "")\n'
        'for (p in c("glmmTMB", "lme4")) {\n'
        "  ok <- suppressWarnings(suppressPackageStartupMessages(requireNamespace(p, quietly = TRUE)))\n"
        '  cat("PKG", p, if (ok) format(packageVersion(p)) else "missing", "\\n")\n'
        "}\n"
    )
    try:
        out = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as error:
        reason = f"Rscript failed: {error}"
        return None, {"glmmTMB": reason, "lme4": reason}
    version, missing, versions = "R ?", {}, {}
    for parts in (line.split() for line in out.splitlines()):
        if len(parts) == 3 and parts[0] == "VERSION":
            version = f"{parts[1]} {parts[2]}"
        if len(parts) == 3 and parts[0] == "PKG":
            if parts[2] == "missing":
                missing[parts[1]] = (
                    f"R package {parts[1]} not installed (apt-get install r-cran-{parts[1].lower()})"
                )
            else:
                missing[parts[1]], versions[parts[1]] = None, parts[2]
    for p in ("glmmTMB", "lme4"):
        missing.setdefault(p, f"R package {p} not found")
    return version + "".join(f", {p} {v}" for p, v in versions.items()), missing


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
