"""Benchmark: the globals' posterior with the units integrated by quadrature, against NUTS.

Hierarchical logistic model (``benchmarks/common.py``, ``simulate(1000,
seed=0)``: 1 000 groups, 10 Bernoulli observations each, random intercept
and slope), the data and NUTS reference of ``results/guides.md`` and
the Laplace-marginal study this script replaces. Rows:

* **Laplace / quadrature marginal, exact** -- the posterior ∝ exp log p̂_K(θ, z)
  with the units integrated by Laplace (K = 1) or adaptive Gauss–Hermite
  with K nodes per dimension, by self-normalised importance sampling from
  the Gaussian at the Laplace mode: what NUTS on
  ``LaplaceMarginal(quadrature=K)`` gives, without its cost;
* **AmortizedLaplaceGuide, default** -- ``curvi.fit(model, guide)`` with no
  options: q(θ) trained on the joint ELBO;
* **AmortizedLaplaceGuide(quadrature="auto")** -- q(θ) trained on the
  collapsed ELBO (units by quadrature);
* **AmortizedLaplaceGuide(quadrature=5, global_precision="marginal")** --
  the same with q(θ)'s precision the curvature of the quadrature marginal;
* **+ PSIS** -- a guide's q(θ) reweighted by ``curvi.psis`` (collapsed over
  the units with ``--psis-nodes`` nodes, its k̂ reported).

Each row: |Δmean| / NUTS sd and sd / NUTS sd per global (constrained: sigma
itself), the time it took, and its ratio to NUTS's time (NumPyro, measured
when the reference was made; the target is ≤ 1/20).

Usage::

    python benchmarks/accuracy.py   # -> benchmarks/results/accuracy.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import simulate, torch_model  # noqa: E402

import curvi  # noqa: E402
from curvi import ModelView, laplace_mode  # noqa: E402
from curvi.marginal import laplace_hessian  # noqa: E402
from curvi.quadrature import quadrature_log_marginal  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "accuracy.md"
RESULTS_CBPP = HERE / "results" / "accuracy_cbpp.md"
RESULTS_POISSON = HERE / "results" / "accuracy_poisson.md"
RESULTS_PEERS = HERE / "results" / "accuracy_peers.md"
#: Pyro NUTS on cbpp, benchmarks/cbpp_nuts.py's defaults ("about 7 minutes")
CBPP_NUTS_SECONDS = 420.0
GLOBALS = ["beta[0]", "beta[1]", "sigma[0]", "sigma[1]"]
READING = (
    "\nReading: Laplace over each group's two latents shifts the random-effect sds by up to 1.2 "
    "NUTS sd whatever is done with the globals; 5 nodes per dimension remove the shift (K = 5 a"
    "nd 7 agree). The default guide inherits Laplace's shift and its joint curvature's sds, and"
    " its fit says so (its own check, `check_fit`). Training on the collapsed ELBO removes the "
    'shift; the "marginal" precision then gives the sds. PSIS reweighting also recovers the mom'
    "ents, at the cost of one quadrature marginal per draw; its k̂ is noisy when the weights ar"
    "e nearly constant (the last row: ESS 969 of 1 000 with k̂ = 0.76), so read it with the ESS"
    ".\n"
)


def constrained(theta):
    return torch.cat([theta[..., :2], theta[..., 2:].exp()], -1)


def weighted_moments(values, log_w):
    w = torch.softmax(log_w, 0)
    mean = (w.unsqueeze(-1) * values).sum(0)
    var = (w.unsqueeze(-1) * (values - mean) ** 2).sum(0)
    return mean.numpy(), var.sqrt().numpy()


def row(name, mean, sd, seconds, nuts, note=""):
    nuts_mean, nuts_sd, nuts_seconds = nuts
    dmean = np.abs(mean - nuts_mean) / nuts_sd
    ratio = sd / nuts_sd
    met = dmean.max() <= 0.1 and np.abs(ratio - 1).max() <= 0.1
    return (
        f"| {name} | {dmean.max():.3f} | {ratio.min():.3f} – {ratio.max():.3f} | "
        + ", ".join(f"{v:.3f}" for v in dmean)
        + " | "
        + ", ".join(f"{v:.3f}" for v in ratio)
        + f" | {seconds:.1f} | {seconds / nuts_seconds:.3f} | {'yes' if met else 'no'} | {note} |"
    )


def marginal_rows(view, nodes_list, num_draws, constrain, nuts):
    """Rows for the posterior ∝ exp log p̂_K(θ, z) (K = 1: Laplace), by
    self-normalised importance sampling from the Gaussian at the Laplace mode."""
    start = time.perf_counter()
    mode = laplace_mode(view, view.init_theta)
    theta, y_hat = mode.theta.detach(), mode.modes.y.detach()
    gaussian = torch.distributions.MultivariateNormal(
        theta, torch.linalg.inv(-laplace_hessian(view, theta, y_hat))
    )
    mode_seconds = time.perf_counter() - start
    draws = gaussian.sample((num_draws,))
    rows = []
    for nodes in nodes_list:
        start = time.perf_counter()
        with torch.no_grad():
            log_p = torch.stack(
                [
                    quadrature_log_marginal(view, t, y_hat, num_nodes=nodes, create_graph=False).value
                    for t in draws
                ]
            )
        seconds = mode_seconds + time.perf_counter() - start
        log_w = log_p - gaussian.log_prob(draws)
        ess = float(1 / (torch.softmax(log_w, 0) ** 2).sum())
        name = "Laplace marginal, exact" if nodes == 1 else f"quadrature marginal, K = {nodes}, exact"
        mean, sd = weighted_moments(constrain(draws), log_w)
        rows.append(row(name, mean, sd, seconds, nuts, f"{ess:,.0f} effective of {num_draws:,} draws"))
        print(rows[-1], flush=True)
    return rows


def guide_moments(guide, data, num_draws, generator):
    """Moments of the guide's globals (constrained), from ``num_draws`` draws."""
    post = guide.laplace_posterior(*data)
    draws = post.sample(num_draws, generator=generator)
    values = torch.cat([draws[name].reshape(num_draws, -1) for name in guide.view.global_sites], -1)
    return weighted_moments(values, torch.zeros(num_draws))


def fit_guide(model, plate, data, label, options, nuts, args):
    """Fit ``AmortizedLaplaceGuide(model, **options)`` with ``curvi.fit``'s
    defaults: its row (timed, moments from 20 000 draws) and the guide."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    guide = curvi.AmortizedLaplaceGuide(model, unit_plate=plate, **options)
    with warnings.catch_warnings(record=True):  # the default fit's check is reported in the row
        result = curvi.fit(model, guide, *data, progress=False)
    seconds = time.perf_counter() - start
    mean, sd = guide_moments(guide, data, 20000, torch.Generator().manual_seed(args.seed))
    status = "converged" if result.converged else "NOT converged"
    if "may be biased" in result.message:  # the default fit's own check (check_fit)
        estimate = result.message.split("; Laplace's integrals over the units move q(θ) by ")[1]
        status += " and warned: " + estimate.split(":")[0]
    nodes = f", K = {guide.collapsed_nodes}" if guide.collapsed_nodes else ""
    note = f"{status}{nodes}; {result.num_evaluations} evaluations"
    text = row(f"AmortizedLaplaceGuide, {label}", mean, sd, seconds, nuts, note)
    print(text, flush=True)
    return text, guide, seconds


def table(title, description, names, rows):
    return (
        f"\n## {title}\n\n{description}\n\n"
        "| posterior | max abs(Δmean) / NUTS sd | sd / NUTS sd (min – max) | abs(Δmean)/sd: "
        + ", ".join(names)
        + " | sd ratio: "
        + ", ".join(names)
        + " | seconds | / NUTS time | target met | notes |\n"
        "|---|---:|---:|---|---|---:|---:|---|---|\n" + "\n".join(rows) + "\n"
    )


ACCURATE = ('quadrature=5, global_precision="marginal"', {"quadrature": 5, "global_precision": "marginal"})


def cbpp_part(args):
    """cbpp (15 herds, binomial): the same rows against Pyro NUTS's reference
    (``curvi.datasets.CBPP_NUTS``, ``benchmarks/cbpp_nuts.py``)."""
    from curvi.datasets import CBPP_NUTS, load_cbpp
    from curvi.demo import cbpp_model

    data_set = load_cbpp(dtype=torch.float64)
    data = (data_set.design, data_set.herd, data_set.size, data_set.incidence)
    ref = CBPP_NUTS
    nuts_mean = np.array(list(ref["fixed_effects_mean"]) + [ref["herd_sd_mean"]])
    nuts_sd = np.array(list(ref["fixed_effects_sd"]) + [ref["herd_sd_sd"]])
    nuts = (nuts_mean, nuts_sd, CBPP_NUTS_SECONDS)
    names = ["beta[0]", "beta[1]", "beta[2]", "beta[3]", "sigma"]
    view = ModelView(cbpp_model, *data, unit_plate="herds")
    rows = marginal_rows(view, (1, 5), args.draws, lambda t: torch.cat([t[:, :4], t[:, 4:].exp()], -1), nuts)
    for label, options in (("default", {}), ACCURATE):
        rows.append(fit_guide(cbpp_model, "herds", data, label, options, nuts, args)[0])
    return table(
        "cbpp",
        "`incidence/size ~ period + (1 | herd)`, binomial, the demo's priors (`curvi.demo.cbpp_model`); "
        "NUTS reference `curvi.datasets.CBPP_NUTS` (Pyro NUTS, 8 000 draws after 1 500 warm-up, "
        f"`python benchmarks/cbpp_nuts.py`, about {CBPP_NUTS_SECONDS / 60:.0f} minutes on this kind of "
        "machine: the time ratios are against that).",
        names,
        rows,
    )


POISSON_REFERENCE = HERE / "reference" / "nuts_poisson_1000.json"


def simulate_poisson(num_groups=1000, num_obs=5, seed=0):
    """Poisson counts with a random intercept and slope per group (two latents
    per unit), small counts: log rate = β₀ + u₀ + (β₁ + u₁) x."""
    rng = np.random.default_rng(seed)
    beta, sigma = np.array([0.3, 0.4]), np.array([0.6, 0.4])
    u = rng.normal(size=(num_groups, 1, 2)) * sigma
    x = rng.normal(size=(num_groups, num_obs))
    y = rng.poisson(np.exp(beta[0] + u[..., 0] + (beta[1] + u[..., 1]) * x)).astype(np.float64)
    return x, y


def poisson_model(x, y):
    import pyro.distributions as dist

    beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    with pyro.plate("groups", x.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma).to_event(1))
        log_rate = beta[..., 0] + u[..., 0] + (beta[..., 1] + u[..., 1]) * x
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Poisson(log_rate.exp()), obs=y)


def poisson_nuts_reference(warmup=1000, samples=4000, chains=2, seed=0):
    """NumPyro NUTS on the non-centred Poisson model; writes POISSON_REFERENCE."""
    import numpyro

    numpyro.set_host_device_count(chains)
    import jax
    import numpyro.distributions as ndist
    from numpyro.infer import MCMC, NUTS

    jax.config.update("jax_enable_x64", True)

    def model(x, y):
        beta = numpyro.sample("beta", ndist.Normal(0.0, 5.0).expand([2]).to_event(1))
        sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0).expand([2]).to_event(1))
        with numpyro.plate("groups", x.shape[0], dim=-2):
            z = numpyro.sample("z", ndist.Normal(0.0, 1.0).expand([2]).to_event(1))
            u = sigma * z
            log_rate = beta[..., 0] + u[..., 0] + (beta[..., 1] + u[..., 1]) * x
            with numpyro.plate("obs", x.shape[1], dim=-1):
                numpyro.sample("y", ndist.Poisson(jax.numpy.exp(log_rate)), obs=y)

    x, y = simulate_poisson()
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, num_chains=chains, progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), x, y)
    draws = jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - start
    flat = np.concatenate([np.asarray(draws["beta"]), np.asarray(draws["sigma"])], -1)
    info = {
        "what": "NUTS posterior of (beta[0], beta[1], sigma[0], sigma[1]) of accuracy.poisson_model",
        "data": "accuracy.simulate_poisson(1000, 5, seed=0)",
        "chains": chains,
        "warmup": warmup,
        "samples": samples,
        "seconds": round(seconds, 1),
        "mean": flat.mean(0).tolist(),
        "sd": flat.std(0, ddof=1).tolist(),
        "numpyro": numpyro.__version__,
        "command": "python benchmarks/accuracy.py --part poisson (made when missing)",
    }
    POISSON_REFERENCE.write_text(json.dumps(info, indent=1) + "\n")
    return info


def poisson_part(args):
    """The Poisson GLMM with two latents per unit against NumPyro's NUTS."""
    if not POISSON_REFERENCE.exists():
        try:
            poisson_nuts_reference()
        except ImportError:
            return "\n## Poisson\n\nskipped: no NUTS reference and numpyro/jax are not installed\n"
    ref = json.loads(POISSON_REFERENCE.read_text())
    nuts = (np.array(ref["mean"]), np.array(ref["sd"]), ref["seconds"])
    x, y = simulate_poisson()
    data = (torch.as_tensor(x), torch.as_tensor(y))
    view = ModelView(poisson_model, *data, unit_plate="groups")
    rows = marginal_rows(view, (1, 5), args.draws, constrained, nuts)
    for label, options in (("default", {}), ACCURATE):
        rows.append(fit_guide(poisson_model, "groups", data, label, options, nuts, args)[0])
    return table(
        "Poisson GLMM, two latents per unit",
        "`accuracy.poisson_model` on `simulate_poisson(1000, 5, seed=0)`: 1 000 groups × 5 counts, log "
        "rate β₀ + u₀ + (β₁ + u₁) x. NUTS reference `benchmarks/reference/nuts_poisson_1000.json` "
        f"(NumPyro, non-centred, {ref['chains']} chains × {ref['samples']:,} draws after "
        f"{ref['warmup']:,} warm-up, {ref['seconds']:.1f} s).",
        GLOBALS,
        rows,
    )


def peers_part(args):
    """Pyro's own Gaussian guides on the 1 000-group logistic GLMM, fitted by
    ``curvi.fit`` with its defaults for them (Adam, lr 0.01, its stopping
    rule), against the same NUTS reference."""
    from pyro.infer import Predictive
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    reference = HERE / "reference" / "nuts_1000.json"
    ref = json.loads(reference.read_text())
    nuts = (np.array(ref["mean"]), np.array(ref["sd"]), ref["seconds"])
    x, y, *_ = simulate(1000, seed=0)
    data = (torch.as_tensor(x), torch.as_tensor(y))
    rows = []
    guides = {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal}
    for name in guides:
        if name not in args.peer_guides:
            rows.append(f"| {name} | – | – | – | – | – | – | – | not run (`--peer-guides`) |")
    for Guide in (guides[name] for name in args.peer_guides):
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = Guide(torch_model)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True):
                result = curvi.fit(torch_model, guide, *data, progress=False, steps=args.peer_steps)
        except (ValueError, RuntimeError) as error:
            rows.append(f"| {Guide.__name__} | – | – | – | – | – | – | no | failed: {str(error)[:120]} |")
            continue
        seconds = time.perf_counter() - start
        with torch.no_grad():
            # parallel: the sequential Predictive keeps every guide trace, and each of
            # AutoMultivariateNormal's holds its 2 004² scale_tril (4 000 × 32 MB)
            draws = Predictive(
                torch_model, guide=guide, num_samples=4000, return_sites=["beta", "sigma"], parallel=True
            )(*data)
        values = torch.cat([draws["beta"].reshape(4000, 2), draws["sigma"].reshape(4000, 2)], -1)
        mean, sd = weighted_moments(values, torch.zeros(4000))
        status = f"{result.message}"
        rows.append(row(Guide.__name__, mean, sd, seconds, nuts, status))
        print(rows[-1], flush=True)
    return table(
        "Pyro's guides on the logistic GLMM (1 000 groups)",
        f"`curvi.fit(model, guide, *data, steps={args.peer_steps})` (Adam, lr 0.01, single-particle "
        "Trace_ELBO, curvi.fit's stopping rule); moments from 4 000 draws of the guide; the same NUTS "
        "reference as results/accuracy.md. (results/guides.md trains them longer, on an ELBO budget.)",
        GLOBALS,
        rows,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=1000, help="importance-sampling draws")
    parser.add_argument("--nodes", type=int, nargs="*", default=[1, 3, 5, 7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--psis-nodes", type=int, default=5, help="quadrature nodes of the PSIS weights")
    parser.add_argument("--groups", type=int, default=1000, help="groups of the logistic GLMM")
    parser.add_argument("--no-psis", action="store_true", help="leave out the PSIS rows")
    parser.add_argument("--peer-steps", type=int, default=5000, help="Adam steps at most for Pyro's guides")
    parser.add_argument(
        "--peer-guides",
        nargs="*",
        default=["AutoNormal", "AutoMultivariateNormal"],
        choices=["AutoNormal", "AutoMultivariateNormal"],
        help="Pyro's guides to run",
    )
    parser.add_argument(
        "--part",
        choices=["all", "logistic", "cbpp", "poisson", "peers"],
        default="all",
        help="which data (cbpp, poisson: their own files)",
    )
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)

    for part, make, results, title in (
        ("peers", peers_part, RESULTS_PEERS, "Pyro's guides: the peers part"),
        ("poisson", poisson_part, RESULTS_POISSON, "The Poisson part"),
        ("cbpp", cbpp_part, RESULTS_CBPP, "The cbpp part"),
    ):
        if args.part in ("all", part):
            text = f"# {title} of results/accuracy.md\n" + make(args)
            print(text)
            results.write_text(text)
            print(f"written to {results}")
    if args.part not in ("all", "logistic"):
        return
    reference = HERE / "reference" / f"nuts_{args.groups}.json"
    if not reference.exists():
        print(
            f"no NUTS reference at {args.groups:,} groups ({reference}): make it with "
            f"python benchmarks/guides.py --nuts-worker {args.groups}"
        )
        return
    ref = json.loads(reference.read_text())
    nuts = (np.array(ref["mean"]), np.array(ref["sd"]), ref["seconds"])
    x, y, *_ = simulate(args.groups, seed=0)
    data = (torch.as_tensor(x), torch.as_tensor(y))
    # the marginals, exact by importance sampling from the Laplace Gaussian
    view = ModelView(torch_model, *data, unit_plate="groups")
    rows = marginal_rows(view, args.nodes, args.draws, constrained, nuts)

    # the guides, with no options and with quadrature, then reweighted
    configurations = (
        ("default", {}, True),
        ('quadrature="auto"', {"quadrature": "auto"}, False),
        (*ACCURATE, True),
    )
    for label, options, reweigh in configurations:
        text, guide, seconds = fit_guide(torch_model, "groups", data, label, options, nuts, args)
        rows.append(text)
        if not reweigh or args.no_psis:
            continue
        start = time.perf_counter()
        weighed = curvi.psis(torch_model, guide, *data, num_samples=args.draws, quadrature=args.psis_nodes)
        psis_seconds = time.perf_counter() - start
        mean = np.concatenate([weighed.mean["beta"].numpy(), weighed.mean["sigma"].numpy()])
        sd = np.concatenate([weighed.sd["beta"].numpy(), weighed.sd["sigma"].numpy()])
        rows.append(
            row(
                f"AmortizedLaplaceGuide, {label}, + PSIS",
                mean,
                sd,
                seconds + psis_seconds,
                nuts,
                f"k̂ = {weighed.k_hat:.2f}, ESS {weighed.ess:,.0f}, K = {weighed.num_nodes}",
            )
        )
        print(rows[-1], flush=True)

    text = (
        "# The globals' posterior with the units integrated by quadrature, against NUTS\n\n"
        f"Hierarchical logistic model, `simulate({args.groups}, seed=0)` ({args.groups:,} groups × 10 "
        f"Bernoulli observations, random intercept and slope); float64. Machine: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}. "
        f"Command: `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`.\n\n"
        f"NUTS reference: `benchmarks/reference/{reference.name}` (NumPyro, {ref['chains']} chains × "
        f"{ref['samples']:,} draws after {ref['warmup']:,} warm-up, {ref['seconds']:.1f} s on this "
        "kind of machine; the time ratios are against it). Target: every global within 0.1 NUTS sd "
        'in mean and 10 % in sd, in ≤ 1/20 of NUTS\'s time ("target met" is the accuracy part; '
        'the time part is "/ NUTS time" ≤ 0.050).\n\n'
        "| posterior | max abs(Δmean) / NUTS sd | sd / NUTS sd (min – max) | abs(Δmean)/sd: "
        + ", ".join(GLOBALS)
        + " | sd ratio: "
        + ", ".join(GLOBALS)
        + " | seconds | / NUTS time | target met | notes |\n"
        "|---|---:|---:|---|---|---:|---:|---|---|\n" + "\n".join(rows) + "\n" + READING
    )
    print(text)
    results = RESULTS if args.groups == 1000 else RESULTS.with_name(f"accuracy_{args.groups}.md")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text if args.groups == 1000 else text.replace(READING, "\n"))
    print(f"written to {results}")


if __name__ == "__main__":
    main()
